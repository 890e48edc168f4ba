"""A direction method is one strategy: its name, its settings block, the layers it reads, its fit.

A method is a :class:`DirectionMethod` subclass registered with :func:`register_method` in its
own module of :mod:`calibrate.directions` (every module there is imported when the package is).
It receives a :class:`FitRequest` — the model, the prompts and calibration rows to fit on, the
layers, the seed, its own settings block (``direction.<name>``) and the job's cached probe — and
returns a unit :class:`~calibrate.core.direction.Direction`::

    @register_method
    class MyMethod(DirectionMethod):
        name = "my_method"
        Settings = MySettings          # optional: the block ``direction.my_method``

        def fit(self, request: FitRequest) -> Direction:
            residuals = request.residuals()
            ...

Sign convention of every method: +η is meant to lower confidence (reduce over-confidence), as
the paper's layer_diff ĉ does along the correction phase.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from calibrate.core.direction import Direction, residual_layers_for
from calibrate.engine.probe import ProbeResult
from calibrate.engine.readout import Readout
from calibrate.model.load import LoadedModel
from calibrate.plugins import add_plugin
from calibrate.tasks.prompts import PromptSet

Probe = Callable[[PromptSet, Sequence[int]], ProbeResult]  # the job's cached unsteered probe


@dataclass
class FitRequest:
    """What a direction method is given."""

    loaded: LoadedModel
    prompt_set: PromptSet     # the prompts to fit on (the job's, or direction.source's)
    cal_idx: np.ndarray       # the calibration rows of ``prompt_set``
    layers: list[int]         # direction.layers, resolved
    steer_layers: list[int]   # the layers the job edits (intervention.layers, resolved)
    seed: int
    settings: Any             # the method's own block (direction.<name>), or None
    keep: list[int]           # residual layers the job's probe keeps
    probe: Probe              # cached probe of a prompt set keeping residual layers
    readout: Readout          # how every layer is read (the gradient fit reads through it)
    prefix_reuse: bool = True  # probe.prefix_reuse: shared exemplar prefixes run once

    @property
    def last_layer(self) -> int:
        """The model's last layer (the output of its last block)."""
        return self.loaded.adapter.num_blocks

    def result(self) -> ProbeResult:
        """The unsteered probe of the fit's prompts, with the residuals of ``keep``."""
        return self.probe(self.prompt_set, self.keep)

    def residuals(self) -> dict[int, np.ndarray]:
        """Last-position residuals ``{layer: [n_calibration, hidden]}`` of the layer differences."""
        result = self.result()
        return {l: result.residuals[l][self.cal_idx] for l in residual_layers_for(self.layers)}


class DirectionMethod(ABC):
    """How ĉ is fit. Subclasses set ``name`` (and ``Settings``) and implement :meth:`fit`."""

    name: ClassVar[str]
    Settings: ClassVar[type | None] = None  # dataclass of the block direction.<name>, checked

    def extra_layers(self, settings: Any, steer_layers: Sequence[int], last: int) -> list[int]:
        """Residual layers the fit reads beyond the layer differences (kept by the probe)."""
        return []

    @abstractmethod
    def fit(self, request: FitRequest) -> Direction:
        """A unit direction fit on ``request.cal_idx`` of ``request.prompt_set``."""

    def per_layer(self, request: FitRequest) -> dict[int, np.ndarray]:
        """The per-layer directions behind ĉ, where it has them (for the null-space report)."""
        return {}

    def write_files(self, direction: Direction, folder: Path, plots: bool) -> list[Path]:
        """Files the method leaves beside direction.safetensors (e.g. a loss curve)."""
        return []

    def check_shape(self, settings: Any, num_blocks: int) -> None:
        """Checks of the method's settings that need the model's depth (before any weight)."""


METHODS: dict[str, DirectionMethod] = {}


def register_method(cls: type[DirectionMethod]) -> type[DirectionMethod]:
    """Class decorator: make a direction method available under its ``name``."""
    return add_plugin(METHODS, cls, "direction method")


def get_method(name: str) -> DirectionMethod:
    """A registered method by name."""
    from calibrate.core.direction import DirectionError

    if name not in METHODS:
        raise DirectionError(f"direction.method={name!r}; accepted: {', '.join(METHODS)}")
    return METHODS[name]
