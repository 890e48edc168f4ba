"""Representation-engineering directions from residuals: ``pca`` and ``probe``.

Pure numpy/scipy functions of cached last-position residuals; the registry entries that feed
them a job's calibration split live in :mod:`calibrate.directions.fit`.

Sign convention (every method): **+η is meant to lower the model's confidence**, the way the
paper's ``layer_diff`` ĉ does (the correction phase lowers confidence, and ĉ points along the
updates written there).

* ``pca``: the first principal component of the per-example normalised layer differences
  c_{i,l} = (A_l - A_{l-1}) / ||A_l - A_{l-1}|| over ``direction.layers`` (the very vectors
  layer_diff averages), centred before the decomposition as representation-engineering tools
  (repeng's ``pca_diff``, sklearn's PCA) do. A principal axis has no sign of its own: it is
  oriented so that the differences project positively on it on average (so that its cosine
  with layer_diff's ĉ is >= 0), i.e. +η moves along the correction phase's updates.
* ``probe``: the weight vector w of an L2-regularised logistic regression predicting, from the
  residual at one layer, whether the model's final answer is correct. w points towards
  "correct"; the direction is **-w/||w||** (towards the residuals of examples the model gets
  wrong, which the lens reads with lower confidence), so +η reduces over-confidence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize

from calibrate.core.direction import Direction, DirectionError


def normalised_differences(residuals: Mapping[int, np.ndarray], layers: Sequence[int]) -> np.ndarray:
    """[N * len(layers), H] float64: each example's unit layer difference at each layer."""
    rows = []
    for layer in layers:
        diff = residuals[layer].astype(np.float64) - residuals[layer - 1].astype(np.float64)
        norms = np.linalg.norm(diff, axis=1, keepdims=True)
        rows.append(diff / np.where(norms == 0.0, 1.0, norms))
    return np.concatenate(rows, axis=0)


def pca_direction(residuals: Mapping[int, np.ndarray], layers: Sequence[int]) -> Direction:
    """First principal component of the centred per-example layer differences (see module doc)."""
    diffs = normalised_differences(residuals, layers)
    if diffs.shape[0] < 2:
        raise DirectionError("direction.method=pca needs at least 2 difference vectors; "
                             "raise dataset.limit or add direction.layers")
    mean = diffs.mean(axis=0)
    _, sv, vt = np.linalg.svd(diffs - mean, full_matrices=False)
    axis = vt[0]
    projection = float(diffs.mean(axis=0) @ axis)
    if projection < 0:
        axis = -axis
    var = sv ** 2
    return Direction(axis / np.linalg.norm(axis), {
        "method": "pca", "layers": [int(x) for x in layers], "hidden": int(diffs.shape[1]),
        "n_examples": int(next(iter(residuals.values())).shape[0]),
        "explained_variance_ratio": float(var[0] / max(var.sum(), 1e-300)),
        "mean_projection": abs(projection),
        "sign": "oriented so the layer differences project positively (cosine with layer_diff >= 0)",
    })


def logistic_regression(x: np.ndarray, y: np.ndarray, c: float = 1.0,
                        tol: float = 1e-10, max_iter: int = 10_000) -> tuple[np.ndarray, float]:
    """L2-regularised binary logistic regression with an unpenalised intercept (sklearn's
    objective with ``C=c``): minimises 0.5·||w||² + c·Σ log(1 + exp(-s_i (w·x_i + b))),
    s_i = ±1. Returns (w, b). Solved with L-BFGS on the exact gradient in float64."""
    x = np.asarray(x, dtype=np.float64)
    s = np.where(np.asarray(y).astype(bool), 1.0, -1.0)
    n, h = x.shape

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:h], theta[h]
        margin = s * (x @ w + b)
        value = 0.5 * w @ w + c * np.logaddexp(0.0, -margin).sum()
        g = -c * s * _sigmoid(-margin)  # d/d(x·w+b) of the data term
        return float(value), np.concatenate([w + x.T @ g, [g.sum()]])

    result = minimize(loss, np.zeros(h + 1), jac=True, method="L-BFGS-B",
                      options={"maxiter": max_iter, "gtol": tol, "ftol": 1e-15})
    return result.x[:h], float(result.x[h])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def probe_direction(residual: np.ndarray, correct: np.ndarray, layer: int, c: float = 1.0) -> Direction:
    """-w/||w|| of a logistic regression of ``correct`` [N] on ``residual`` [N, H] (module doc)."""
    correct = np.asarray(correct).astype(bool)
    n_correct = int(correct.sum())
    if n_correct == 0 or n_correct == len(correct):
        raise DirectionError(f"direction.method=probe needs both correct and incorrect answers on "
                             f"the calibration split; the model got {n_correct} of "
                             f"{len(correct)} right (raise dataset.limit)")
    w, b = logistic_regression(residual, correct, c)
    norm = float(np.linalg.norm(w))
    if not np.isfinite(norm) or norm == 0.0:
        raise DirectionError("direction.method=probe: the logistic regression weights are zero")
    scores = residual.astype(np.float64) @ w + b
    return Direction(-w / norm, {
        "method": "probe", "layers": [int(layer)], "hidden": int(residual.shape[1]),
        "n_examples": int(len(correct)), "n_correct": n_correct, "c": float(c),
        "raw_norm": norm, "intercept": b,
        "train_accuracy": float(((scores > 0) == correct).mean()),
        "sign": "-w/|w|: from correct towards incorrect answers (+eta lowers confidence)",
    })
