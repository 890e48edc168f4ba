"""From option scores to option probabilities (float64), and the full-vocabulary mass on them."""

from __future__ import annotations

import numpy as np
import torch

# Up to this many options numpy's sum over the option axis adds the options one after another
# from 0 (its pairwise summation starts at 8 elements), so the slice-by-slice sum below is the
# same float64 number; beyond it the reductions are numpy's own.
SLICED_OPTIONS = 7


def _sliced(x: np.ndarray) -> bool:
    return x.ndim >= 1 and 1 <= x.shape[-1] <= SLICED_OPTIONS


def option_max(x: np.ndarray) -> np.ndarray:
    """``x.max(axis=-1)``: the same values (NaN propagates in both), as an elementwise maximum of
    the option slices when there are at most :data:`SLICED_OPTIONS` of them. numpy's reduction
    over a short last axis costs ~30x the elementwise pass over the same array, and the
    steering study's searches reduce arrays of 1,000 directions x examples x 2 options."""
    x = np.asarray(x)
    if not _sliced(x):
        return x.max(axis=-1)
    out = x[..., 0].copy()
    for k in range(1, x.shape[-1]):
        np.maximum(out, x[..., k], out=out)
    return out


def option_argmax(x: np.ndarray) -> np.ndarray:
    """``x.argmax(axis=-1)``: the first option holding the largest value, or the first NaN
    (as numpy's), by slices of at most :data:`SLICED_OPTIONS` options of a float array."""
    x = np.asarray(x)
    if x.dtype.kind != "f" or not _sliced(x):
        return x.argmax(axis=-1)
    best = x[..., 0].copy()
    out = np.zeros(best.shape, dtype=np.intp)
    for k in range(1, x.shape[-1]):
        value = x[..., k]
        better = (value > best) | (np.isnan(value) & ~np.isnan(best))
        out[better] = k
        np.copyto(best, value, where=better)
    return out


def option_sum(x: np.ndarray) -> np.ndarray:
    """``x.sum(axis=-1)`` of float64 ``x``, bit for bit: with at most :data:`SLICED_OPTIONS`
    options numpy adds them in order from 0 (``((0 + x_0) + x_1) + ...``), and so does this, as
    elementwise additions of the option slices (-0.0 sums to 0.0 in both)."""
    x = np.asarray(x)
    if x.dtype != np.float64 or not _sliced(x):
        return x.sum(axis=-1)
    out = np.zeros(x.shape[:-1])
    for k in range(x.shape[-1]):
        np.add(out, x[..., k], out=out)
    return out


def option_probabilities(logits: np.ndarray) -> np.ndarray:
    """Float64 softmax over the option axis; -inf slots get probability 0.

    Computed in float64 from float32 logits: a float32 softmax over a few logits returns exactly
    1.0 once their gap exceeds ~17, which late layers reach. The option-axis reductions are
    :func:`option_max` and :func:`option_sum` (numpy's own values, faster on few options).
    """
    x = logits.astype(np.float64)
    x = x - option_max(x)[..., None]
    e = np.exp(x)
    return e / option_sum(e)[..., None]


def option_log_softmax(x: np.ndarray) -> np.ndarray:
    """``scipy.special.log_softmax(x, axis=-1)`` of float64 ``x``, the same arithmetic step by
    step (the max, set to 0 where it is not finite, subtracted; minus the log of the summed
    exponentials) with the option-axis reductions of :func:`option_max` and :func:`option_sum`
    and without scipy's array-API dispatch, which costs more than the arithmetic on the small
    [N, K] arrays that the baselines' fits evaluate hundreds of times."""
    x = np.asarray(x)
    if x.dtype != np.float64 or not _sliced(x):
        from scipy.special import log_softmax

        return log_softmax(x, axis=-1)
    top = option_max(x)[..., None]
    top[~np.isfinite(top)] = 0
    tmp = x - top
    with np.errstate(divide="ignore"):
        out = np.log(option_sum(np.exp(tmp))[..., None])
    return np.subtract(tmp, out, out=tmp)  # in place: no temporary on [directions, N, K] arrays


def option_mass(option_logits: torch.Tensor, logsumexp: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary probability mass on the options: [..., K] and [...] -> [...] float64."""
    return torch.exp(torch.logsumexp(option_logits.double(), dim=-1) - logsumexp)
