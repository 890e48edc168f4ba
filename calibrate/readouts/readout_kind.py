"""A readout is one strategy: its name, its settings (the ``lens`` group option), how it is built.

The engine reads every layer through a :class:`~calibrate.engine.readout.Readout`; which one a
job uses is the ``lens`` config group (``lens=logit``, the default). A readout strategy is a
:class:`ReadoutKind` registered with :func:`register_readout` in its own module of
:mod:`calibrate.readouts` (every module there is imported with the package)::

    @register_readout
    class MyLens(ReadoutKind):
        name = "my_lens"
        Settings = MyLensSettings      # a dataclass with ``name: str = "my_lens"`` first

        def build(self, settings, source):
            return MyReadout(source.loaded, ...)

``source`` (:class:`ReadoutSource`) holds what a fitted readout may train on: the model, the
job's calibration prompts (never the evaluated rows), the job's seed and the cache folder. A kind
that fits on those prompts says so (:meth:`ReadoutKind.fits_on_prompts`): the job then gives it
the calibration split even in the ``probe`` study, which reports the evaluation split only. A
kind that reads only the answer options (``full_vocabulary = False``) is refused, in one line
before any job starts, for cloze scoring and the full-vocabulary option mass
(:meth:`ReadoutKind.check_job`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from calibrate.engine.readout import Readout
from calibrate.errors import ConfigError
from calibrate.model.load import LoadedModel
from calibrate.plugins import add_plugin
from calibrate.tasks.prompts import PromptSet


@dataclass
class ReadoutSource:
    """What a readout may be built from."""

    loaded: LoadedModel
    calibration_prompts: PromptSet | None  # the job's calibration split (None: no split)
    cache_dir: str | Path | None = None
    seed: int = 0  # the job's seed (a readout's own ``seed: null`` follows it)
    split: dict[str, Any] | None = None  # what the calibration split is (metrics.json)


class ReadoutKind(ABC):
    """How a job's readout is made. Subclasses set ``name`` and ``Settings``."""

    name: ClassVar[str]
    Settings: ClassVar[type]  # dataclass of the ``lens`` node of this option (has ``name``)
    full_vocabulary: ClassVar[bool] = True  # its readouts read every token (cloze, option mass)

    def fits_on_prompts(self, settings: Any) -> bool:
        """Whether a readout with these settings is fit on the job's own (calibration) prompts."""
        return False

    def check_job(self, settings: Any, answer_format: str, option_mass: str) -> None:
        """Refuse, in one line naming the value, a job this readout cannot read (cheap checks
        only: nothing is loaded)."""
        if self.full_vocabulary:
            return
        if answer_format == "cloze":
            raise ConfigError(f"lens={self.name} reads only the answer options; "
                              "dataset.answer_format='cloze' scores every continuation token "
                              "over the whole vocabulary; accepted with this lens: "
                              "dataset.answer_format=letters or verbalizer")
        if option_mass != "none":
            raise ConfigError(f"probe.option_mass={option_mass!r} is the full-vocabulary mass "
                              f"on the options, and lens={self.name} reads only the options; "
                              "accepted with this lens: probe.option_mass=none")

    @abstractmethod
    def build(self, settings: Any, source: ReadoutSource) -> Readout:
        """The readout of ``source.loaded`` with these settings."""


READOUTS: dict[str, ReadoutKind] = {}


def register_readout(cls: type[ReadoutKind]) -> type[ReadoutKind]:
    """Class decorator: make a readout available as ``lens=<name>``."""
    return add_plugin(READOUTS, cls, "readout")


def build_readout(settings: Any, source: ReadoutSource) -> Readout:
    """The readout the ``lens`` settings name."""
    return kind_of(settings).build(settings, source)


def kind_of(settings: Any) -> ReadoutKind:
    """The registered kind the ``lens`` settings name."""
    name = getattr(settings, "name", None)
    if name not in READOUTS:
        raise ConfigError(f"lens={name!r}; accepted: {', '.join(sorted(READOUTS))}")
    return READOUTS[name]
