"""``probe``: -w/‖w‖ of a logistic regression separating the calibration rows the model answers
correctly (its unsteered final answer) from the others, on the residual at one layer
(:func:`calibrate.core.direction_methods.probe_direction`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from calibrate import values
from calibrate.core.direction import Direction, DirectionError
from calibrate.core.direction_methods import probe_direction
from calibrate.directions.direction_method import DirectionMethod, FitRequest, register_method


@dataclass
class ProbeDirectionSettings:
    """``direction.probe``: the layer read (null: the last of direction.layers) and sklearn's C."""

    layer: int | None = None
    c: float = 1.0  # inverse L2 strength of the logistic regression

    def __post_init__(self) -> None:
        values.optional_integer("direction.probe.layer", self.layer, 0, DirectionError)
        self.c = values.number("direction.probe.c", self.c, lambda c: c > 0, "a number > 0",
                               DirectionError)


@register_method
class CorrectnessProbe(DirectionMethod):
    """A linear probe of answer correctness; +η points from correct towards wrong answers."""

    name = "probe"
    Settings = ProbeDirectionSettings

    def extra_layers(self, settings: Any, steer_layers: Sequence[int], last: int) -> list[int]:
        return [] if settings.layer is None else [settings.layer]

    def check_shape(self, settings: Any, num_blocks: int) -> None:
        if settings.layer is not None and not 0 <= settings.layer <= num_blocks:
            raise DirectionError(f"direction.probe.layer={settings.layer}: outside this model's "
                                 f"0..{num_blocks}; accepted: layer numbers in 0..{num_blocks}")

    def fit(self, request: FitRequest) -> Direction:
        settings = request.settings
        layer = settings.layer if settings.layer is not None else max(request.layers)
        result, cal = request.result(), request.cal_idx
        correct = result.probs[cal, -1].argmax(-1) == result.labels[cal]
        return probe_direction(result.residuals[layer][cal], correct, layer, settings.c)
