"""The job spec: built once from the composed config, checked, and carrying the result's identity.

Everything a job decides from its config is decided here, once: the typed tree
(:func:`calibrate.config.compose.typed`), which study runs (``intervention.name``), the η values
(normalised, 0 first), the resolved config of ``direction.source``, and the identity of the
result — a hash of the *result-relevant* config (every key but those that cannot change a
number: tracking, resume, cache folder, progress bars, batching, plot switches). Caches and
resume compare that identity; metrics.json records it.

Checks that need the model's shape (layer ranges, null-space k) run in :func:`check_shape` on
the shape read from the model's config, before any weight is read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from calibrate.config.compose import compose, group_options, typed
from calibrate.config.schema import Config
from calibrate.errors import ConfigError
from calibrate.readouts import kind_of
from calibrate.tasks.dataset_config import DatasetConfig
from calibrate.tasks.shots import check_style

# Keys (dotted prefixes) that cannot change a reported number; left out of the identity.
NON_RESULT_KEYS = ("tracker", "resume", "cache_dir", "hydra", "checks", "probe.progress",
                   "probe.batch_size", "probe.max_batch_size", "probe.max_tokens", "probe.min_fill",
                   "probe.prefix_reuse", "output.plots")
FLOAT32_MAX = 3.4028234663852886e38


@functools.lru_cache(maxsize=1)
def process_uid() -> str:
    """Six hex digits, fixed for this process: part of every run and sweep folder name."""
    return secrets.token_hex(3)


if not OmegaConf.has_resolver("calibrate_uid"):
    OmegaConf.register_new_resolver("calibrate_uid", process_uid, use_cache=True)


@dataclass(frozen=True)
class JobSpec:
    """One job, decided: the typed config, the study, its η values, and its identity."""

    config: Config                       # the typed tree (every group checked)
    recorded: dict[str, Any]             # the resolved config as plain containers (metrics.json)
    study: str                           # the registered study that runs (intervention.name)
    etas: tuple[float, ...]              # steering: 0 first, then the others in order; else ()
    identity: str                        # config_hash(recorded)
    direction_source: DatasetConfig | None = None  # direction.source's dataset config, resolved
    eta_fit: bool = False                # eta lists ``fit``: the direction's fitted norm, resolved
                                         # by the study once the direction is fit

    def __getattr__(self, name: str) -> Any:
        """The typed groups by name: ``spec.metrics`` is ``spec.config.metrics``."""
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.config, name)

    @property
    def fits_readout(self) -> bool:
        """True when the lens is fit on the job's own prompts (its calibration split)."""
        return kind_of(self.config.lens).fits_on_prompts(self.config.lens)

    @property
    def uses_split(self) -> bool:
        """True when the job fits something on a calibration split and reports the evaluation
        split: every study but ``probe``, and ``probe`` too under a lens fit on the job's
        prompts (the lens never sees an evaluated row)."""
        return self.study != "probe" or self.fits_readout

    def relevant(self) -> dict[str, Any]:
        """The result-relevant part of the recorded config (what :attr:`identity` hashes)."""
        return result_config(self.recorded)


def _plain(cfg: Any) -> dict[str, Any]:
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return json.loads(json.dumps(cfg, default=str))


def _drop(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(leaf, None)


def result_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config without the keys that cannot change a result (:data:`NON_RESULT_KEYS`)."""
    tree = _plain(cfg)
    for key in NON_RESULT_KEYS:
        _drop(tree, key)
    return tree


def config_hash(cfg: Mapping[str, Any]) -> str:
    """sha256 (16 hex digits) of the result-relevant config, canonical JSON."""
    text = json.dumps(result_config(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": value}``; lists stay values."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, Mapping) and value else {name: value})
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every result-relevant key that differs (sorted)."""
    a, b = flatten(result_config(old)), flatten(result_config(new))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


ETA_FIT = "fit"


def split_fit(value: Any) -> tuple[Any, bool]:
    """``eta`` without the word ``fit`` (the fitted norm of a gradient direction), and whether
    it was there: ``fit`` -> (0, True), ``[0, 0.1, fit]`` -> ([0, 0.1], True)."""
    if value == ETA_FIT:
        return 0, True
    if isinstance(value, Sequence) and not isinstance(value, str) and ETA_FIT in list(value):
        rest = [v for v in value if v != ETA_FIT]
        return (rest or 0), True
    return value, False


def parse_eta(value: Any) -> list[float]:
    """η as a list of finite floats; accepts one number or a list of numbers."""
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if not items:
        raise ConfigError("eta is an empty list; give a number or a list of numbers, e.g. eta=4")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float, str)):
            raise ConfigError(f"eta={item!r} is not a number; accepted: finite numbers, or "
                              f"{ETA_FIT} (a gradient direction's fitted norm)")
        try:
            number = float(item)
        except ValueError:
            raise ConfigError(f"eta={item!r} is not a number; accepted: finite numbers, or "
                              f"{ETA_FIT} (a gradient direction's fitted norm)") from None
        if not math.isfinite(number):
            raise ConfigError(f"eta={item!r} is not finite; accepted: finite numbers")
        if abs(number) >= math.sqrt(FLOAT32_MAX):
            raise ConfigError(f"eta={item!r} overflows the float32 read of the edited residual "
                              f"(its square exceeds {FLOAT32_MAX:.3g}); accepted: |eta| < "
                              f"{math.sqrt(FLOAT32_MAX):.3g}")
        out.append(number)
    return out


def steering_etas(value: Any) -> tuple[float, ...]:
    """η values to run: 0 first (the reference of every delta), then the others, deduplicated."""
    etas = parse_eta(0 if value is None else value)
    return (0.0, *[e for e in dict.fromkeys(etas) if e != 0.0])


def _study(config: Config) -> str:
    study = config.intervention.name
    accepted = group_options("intervention")
    if study not in accepted:
        raise ConfigError(f"intervention.name={study!r} names no study; accepted: "
                          f"{', '.join(accepted)}")
    return study


def source_dataset(config: Config) -> DatasetConfig | None:
    """``direction.source``'s dataset config, composed as the CLI would compose it (its own
    config file, the job's seed, ``direction.source_limit``)."""
    name = config.direction.source
    if name is None:
        return None
    accepted = group_options("dataset")
    if name not in accepted:
        raise ConfigError(f"direction.source={name!r}; accepted: {', '.join(accepted)}")
    overrides = [f"dataset={name}", f"seed={config.seed}"]
    if config.direction.source_limit is not None:
        overrides.append(f"dataset.limit={config.direction.source_limit}")
    return typed(compose(overrides)).dataset


def build_spec(cfg: DictConfig) -> JobSpec:
    """Check a composed config (cheap checks only, nothing loaded) and decide the job."""
    config = typed(cfg)
    check_style(config.prompt, config.dataset)  # needs two groups: MMLU's shots, its dev split
    kind_of(config.lens).check_job(config.lens, config.dataset.answer_format,
                                  config.probe.option_mass)
    recorded = _plain(cfg)
    recorded.pop("hydra", None)
    study = _study(config)
    eta, eta_fit = split_fit(config.eta)
    etas = steering_etas(eta) if study == "steering" else ()
    if eta is not None and study != "steering":
        parse_eta(eta)  # a bad value is refused even where it is not read
    if eta_fit and study == "steering" and config.direction.method != "gradient" \
            and config.direction.path is None:
        raise ConfigError(f"eta={ETA_FIT} steers a direction at its fitted norm, which "
                          f"direction.method={config.direction.method} does not have; accepted: "
                          f"eta={ETA_FIT} with direction.method=gradient (or a direction.path "
                          "saved by one), else numbers")
    source = source_dataset(config)
    if source is not None:
        recorded["direction_source_dataset"] = _plain(OmegaConf.structured(source))
    return JobSpec(config, recorded, study, etas, config_hash(recorded), source, eta_fit)


def _layers_in(name: str, layers: Any, low: int, high: int) -> None:
    if layers in (None, "auto"):
        return
    bad = [l for l in layers if not low <= int(l) <= high]
    if bad:
        raise ConfigError(f"{name}={list(layers)}: layer(s) {bad} outside this model's "
                          f"{low}..{high}; accepted: layer numbers in {low}..{high}")


def check_shape(spec: JobSpec, num_blocks: int, hidden_size: int) -> None:
    """Checks that need the model's shape (from its config): layer ranges and null-space k."""
    if spec.study == "probe":
        return
    _layers_in("intervention.layers", spec.intervention.layers, 0, num_blocks)
    spec.direction.check_shape(num_blocks)
    spec.nullspace.check_shape(hidden_size)


def eta_edit_ratio(etas: tuple[float, ...], scale: float | None, residual_norm: float) -> float:
    """Largest ‖η·ĉ‖ (ĉ unit; times the layer's residual norm with ``residual_norm`` scale)
    relative to the mean residual norm at the edited layer."""
    largest = max((abs(e) for e in etas), default=0.0) * (scale if scale else 1.0)
    return largest / residual_norm if residual_norm > 0 and math.isfinite(residual_norm) else math.inf
