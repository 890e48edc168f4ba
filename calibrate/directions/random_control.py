"""``random``: a seeded random unit vector, the control every steering claim needs."""

from __future__ import annotations

from calibrate.core.direction import Direction, random_direction
from calibrate.directions.direction_method import DirectionMethod, FitRequest, register_method


@register_method
class RandomControl(DirectionMethod):
    """A standard normal vector seeded with ``direction.seed``, scaled to unit norm."""

    name = "random"

    def fit(self, request: FitRequest) -> Direction:
        return random_direction(request.loaded.adapter.unembed_weight.shape[1], request.seed)
