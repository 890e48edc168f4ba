"""``layer_diff`` (the paper's ĉ) and ``mean_diff``: directions from consecutive layers' residuals.

layer_diff: per example c_l = (A_l − A_{l−1}) / ‖A_l − A_{l−1}‖, averaged over the calibration
examples and ``direction.layers``, scaled to unit norm. mean_diff: the differences averaged first,
normalised once at the end (:func:`calibrate.core.direction.fit_direction`).
"""

from __future__ import annotations

import numpy as np

from calibrate.core.direction import Direction, fit_direction, per_layer_directions
from calibrate.directions.direction_method import DirectionMethod, FitRequest, register_method


@register_method
class LayerDiff(DirectionMethod):
    """The paper's ĉ: the mean of the normalised per-example layer differences."""

    name = "layer_diff"

    def fit(self, request: FitRequest) -> Direction:
        return fit_direction(request.residuals(), request.layers, self.name, request.seed)

    def per_layer(self, request: FitRequest) -> dict[int, np.ndarray]:
        return per_layer_directions(request.residuals(), request.layers, self.name)


@register_method
class MeanDiff(LayerDiff):
    """The mean layer difference, normalised once at the end."""

    name = "mean_diff"
