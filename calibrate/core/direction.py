"""The calibration direction: a unit vector with its provenance, and its fit from residual differences.

Layer numbering as everywhere: ``direction.layers = [28, 29, 30]`` uses the differences
A_28 - A_27, A_29 - A_28 and A_30 - A_29, i.e. the updates written by the last three blocks of a
30-block model (the paper's Phi-2 blocks 29-31 counted from 0 are our layers 30-32).

Methods:

* ``layer_diff`` (the paper's): per example c_l = (A_l - A_{l-1}) / ||A_l - A_{l-1}||, averaged
  over examples and layers, then scaled to unit norm;
* ``mean_diff``: the differences averaged over examples and layers first, then normalized;
* ``random``: a seeded random unit vector, the control every steering claim needs.

The representation-engineering family (``pca``, ``probe``) is in
:mod:`calibrate.core.direction_methods`, the gradient-fitted vector in
:mod:`calibrate.core.gradient_fit`; the methods as strategies of a job, and direction files, are
:mod:`calibrate.directions`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from calibrate.errors import UserError

METHODS = ("layer_diff", "mean_diff", "random")


class DirectionError(UserError):
    """A direction cannot be fit, loaded or applied as asked."""


@dataclass
class Direction:
    """A unit vector in the residual stream with where it came from."""

    vector: np.ndarray  # [hidden] float64, unit norm
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden(self) -> int:
        """Residual width the direction lives in."""
        return int(self.vector.shape[0])


def _needed_layers(layers: Sequence[int]) -> list[int]:
    return sorted({layer for pair in ((l - 1, l) for l in layers) for layer in pair})


def residual_layers_for(layers: Sequence[int]) -> list[int]:
    """The residual layers a fit of ``layers`` needs (each layer and the one before it)."""
    return _needed_layers(layers)


def check_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Validate direction layers against a model with ``num_layers`` layers (L + 1)."""
    layers = [int(x) for x in layers]
    bad = [x for x in layers if not 1 <= x <= num_layers - 1]
    if not layers or bad:
        raise DirectionError(f"direction.layers={layers}: each layer must be in 1..{num_layers - 1} "
                             f"(the model has layers 0..{num_layers - 1}; layer 0 has no predecessor)")
    return layers


def _unit(vector: np.ndarray) -> tuple[np.ndarray, float]:
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise DirectionError("the direction has zero or non-finite norm; the residual differences "
                             "cancel out (check direction.layers)")
    return vector / norm, norm


def per_layer_directions(residuals: Mapping[int, np.ndarray], layers: Sequence[int],
                         method: str) -> dict[int, np.ndarray]:
    """For each layer l: the example-mean of c_l (layer_diff) or of A_l - A_{l-1} (mean_diff)."""
    out = {}
    for layer in layers:
        diff = residuals[layer].astype(np.float64) - residuals[layer - 1].astype(np.float64)
        if method == "layer_diff":
            norms = np.linalg.norm(diff, axis=1, keepdims=True)
            diff = diff / np.where(norms == 0.0, 1.0, norms)
        out[layer] = diff.mean(axis=0)
    return out


def cosine_matrix(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Pairwise cosines between vectors (how consistent the per-layer directions are)."""
    stacked = np.stack([v / max(np.linalg.norm(v), 1e-300) for v in vectors])
    return stacked @ stacked.T


def random_direction(hidden: int, seed: int = 0) -> Direction:
    """A seeded random unit vector (standard normal, normalised): the control direction."""
    unit, raw = _unit(np.random.default_rng(seed).standard_normal(hidden))
    return Direction(unit, {"method": "random", "seed": seed, "raw_norm": raw, "hidden": hidden})


def fit_direction(residuals: Mapping[int, np.ndarray], layers: Sequence[int], method: str,
                  seed: int = 0) -> Direction:
    """Fit a direction from last-position residuals ``{layer: [N, hidden]}``."""
    if method not in METHODS:
        raise DirectionError(f"direction.method={method!r}; accepted: {', '.join(METHODS)}")
    hidden = next(iter(residuals.values())).shape[1]
    if method == "random":
        return random_direction(hidden, seed)
    per_layer = per_layer_directions(residuals, layers, method)
    unit, raw = _unit(np.mean(list(per_layer.values()), axis=0))
    cos = cosine_matrix(list(per_layer.values()))
    return Direction(unit, {
        "method": method, "layers": [int(x) for x in layers], "raw_norm": raw, "hidden": hidden,
        "n_examples": int(next(iter(residuals.values())).shape[0]),
        "layer_cosines": cos.tolist(),
        "cosine_to_direction": {str(l): float(v @ unit / max(np.linalg.norm(v), 1e-300))
                                for l, v in per_layer.items()},
    })


def split_indices(n: int, calibration_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split into disjoint calibration and evaluation indices (both sorted, non-empty)."""
    if not 0.0 < calibration_fraction < 1.0:
        raise DirectionError(f"direction.calibration_fraction={calibration_fraction!r}; "
                             "accepted: a number strictly between 0 and 1")
    n_cal = int(round(n * calibration_fraction))
    if n_cal < 1 or n_cal > n - 1:
        raise DirectionError(f"{n} examples cannot be split into calibration and evaluation parts "
                             f"with fraction {calibration_fraction}; raise dataset.limit")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:n_cal]), np.sort(order[n_cal:])


def as_tensor(direction: Direction, like: torch.Tensor) -> torch.Tensor:
    """The unit vector on ``like``'s device and dtype."""
    return torch.as_tensor(direction.vector, dtype=like.dtype, device=like.device)
