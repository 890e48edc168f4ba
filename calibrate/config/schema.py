"""The typed root of the config tree, assembled from every package's settings.

Each group's schema is the dataclass of the package that implements it (``model``:
:class:`~calibrate.model.config.ModelConfig`, ``dataset``:
:class:`~calibrate.tasks.dataset_config.DatasetConfig`, ``direction``: the directions package's
class with one block per registered method …). :func:`register` stores the root in Hydra's
ConfigStore as ``calibrate_schema`` (``calibrate/conf/config.yaml`` lists it first in its
defaults), so Hydra refuses a wrong type while composing, and the options of the ``lens`` group
(one per registered readout). The ``intervention`` group's options are the studies' own names,
stored by :func:`calibrate.studies.study.register`.

Each dataclass checks its values in ``__post_init__``, when :func:`calibrate.config.compose.typed`
turns the composed tree into objects: a value is checked once, next to its type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from calibrate import values
from calibrate.core.metrics import MetricSettings
from calibrate.core.nullspace import NullspaceSettings
from calibrate.core.phases import PhaseSettings
from calibrate.core.posthoc import BaselineSettings
from calibrate.directions import settings_class
from calibrate.engine.edits import InterventionSettings
from calibrate.engine.probe import ProbeSettings
from calibrate.io.results import OutputSettings
from calibrate.io.track import TrackerSettings
from calibrate.model.config import ModelConfig
from calibrate.readouts import READOUTS
from calibrate.tasks.dataset_config import DatasetConfig
from calibrate.tasks.shots import PromptStyle

SCHEMA_NAME = "calibrate_schema"


@dataclass
class CheckSettings:
    """The ``checks`` group: thresholds of the warnings and refusals that guard a run."""

    edit_ratio_warn: float = 100.0  # warn when |eta * c_hat| exceeds the residual norm this much
    max_chars_per_token: float = 64.0  # a prompt longer than context x this is refused untokenized
    edit_ratio_tiny: float = 0.01   # warn when the largest |eta * c_hat| is below this fraction of it
    option_mass_warn: float = 0.1  # warn when the options hold less of the output's mass

    def __post_init__(self) -> None:
        values.number("checks.edit_ratio_warn", self.edit_ratio_warn, lambda r: r >= 0,
                      "a number >= 0 (0: never warn)")
        values.number("checks.edit_ratio_tiny", self.edit_ratio_tiny, lambda r: r >= 0,
                      "a number >= 0 (0: never warn)")
        values.number("checks.max_chars_per_token", self.max_chars_per_token, lambda c: c > 0,
                      "a number > 0")
        values.number("checks.option_mass_warn", self.option_mass_warn, lambda m: 0 <= m <= 1,
                      "a number in [0, 1] (0: never warn)")


@dataclass
class Config:
    """The whole job config (``conf/config.yaml`` documents every key)."""

    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    tracker: TrackerSettings = MISSING
    intervention: InterventionSettings = MISSING
    lens: Any = MISSING  # the chosen readout's settings
    seed: int = 0
    resume: bool = False
    eta: Any = None  # steering strength(s): a number or a list; None: no steering
    cache_dir: str | None = None
    prompt: PromptStyle = field(default_factory=PromptStyle)
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    metrics: MetricSettings = field(default_factory=MetricSettings)
    phases: PhaseSettings = field(default_factory=PhaseSettings)
    baselines: BaselineSettings = field(default_factory=BaselineSettings)
    nullspace: NullspaceSettings = field(default_factory=NullspaceSettings)
    checks: CheckSettings = field(default_factory=CheckSettings)
    output: OutputSettings = field(default_factory=OutputSettings)

    def __post_init__(self) -> None:
        values.integer("seed", self.seed, 0)
        values.flag("resume", self.resume)
        values.optional_text("cache_dir", self.cache_dir)


def root_class() -> type[Config]:
    """:class:`Config` with the ``direction`` group of the registered direction methods."""
    direction = settings_class()
    if direction not in _ROOTS:
        _ROOTS[direction] = dataclasses.make_dataclass(
            "Config", [("direction", direction, field(default_factory=direction))],
            bases=(Config,), namespace={"__doc__": Config.__doc__, "__module__": __name__})
    return _ROOTS[direction]


_ROOTS: dict[type, type[Config]] = {}


def register() -> None:
    """Store the root schema and the readouts' ``lens`` options in Hydra's ConfigStore (again
    after a plug-in registered itself: the latest registration wins)."""
    store = ConfigStore.instance()
    wanted = (root_class(), tuple((name, kind.Settings) for name, kind in READOUTS.items()))
    held = _REGISTERED.get("entries")
    if _REGISTERED.get("wanted") == wanted and held is not None and _same(held, _entries(store)):
        return  # the store holds this very registration: building its nodes again is ~0.1 s
    store.store(name=SCHEMA_NAME, node=wanted[0])
    for name, settings in wanted[1]:
        store.store(group="lens", name=name, node=settings)
    _REGISTERED.update(wanted=wanted, entries=_entries(store))


_REGISTERED: dict[str, Any] = {}


def _entries(store: ConfigStore) -> tuple[Any, ...]:
    """The store's schema node and ``lens`` group entries (a re-store replaces the objects)."""
    lens = store.repo.get("lens", {})
    return (store.repo.get(f"{SCHEMA_NAME}.yaml"), *sorted(lens), *(lens[k] for k in sorted(lens)))


def _same(held: tuple[Any, ...], now: tuple[Any, ...]) -> bool:
    return len(held) == len(now) and all(a is b or (isinstance(a, str) and a == b)
                                         for a, b in zip(held, now))
