"""``pca``: the first principal component of the per-example normalised layer differences,
oriented along them, as representation-engineering tools compute it
(:func:`calibrate.core.direction_methods.pca_direction`)."""

from __future__ import annotations

from calibrate.core.direction import Direction
from calibrate.core.direction_methods import pca_direction
from calibrate.directions.direction_method import DirectionMethod, FitRequest, register_method


@register_method
class Pca(DirectionMethod):
    """First principal component of the centred normalised layer differences."""

    name = "pca"

    def fit(self, request: FitRequest) -> Direction:
        return pca_direction(request.residuals(), request.layers)
