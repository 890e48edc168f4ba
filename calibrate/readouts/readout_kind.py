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
job's calibration prompts (never the evaluated rows) and the cache folder.
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


class ReadoutKind(ABC):
    """How a job's readout is made. Subclasses set ``name`` and ``Settings``."""

    name: ClassVar[str]
    Settings: ClassVar[type]  # dataclass of the ``lens`` node of this option (has ``name``)

    @abstractmethod
    def build(self, settings: Any, source: ReadoutSource) -> Readout:
        """The readout of ``source.loaded`` with these settings."""


READOUTS: dict[str, ReadoutKind] = {}


def register_readout(cls: type[ReadoutKind]) -> type[ReadoutKind]:
    """Class decorator: make a readout available as ``lens=<name>``."""
    return add_plugin(READOUTS, cls, "readout")


def build_readout(settings: Any, source: ReadoutSource) -> Readout:
    """The readout the ``lens`` settings name."""
    name = getattr(settings, "name", None)
    if name not in READOUTS:
        raise ConfigError(f"lens={name!r}; accepted: {', '.join(sorted(READOUTS))}")
    return READOUTS[name].build(settings, source)
