"""Accuracy and calibration metrics over answer options, per layer; pure numpy float64.

Calibration is top-label: an example's confidence is its largest option probability and it is
correct when that option (``np.argmax``, so ties go to the lowest index) is the label.

Binning rules (``binning``), with ``M = n_bins`` and edges ``m / M`` (each the float nearest to
``m / M``, so ``edges[m] == m / M`` in Python):

* ``"guo"`` (Guo et al. 2017, the default): ``M`` equal-width bins, right-closed intervals
  ``((m-1)/M, m/M]``, the first one closed at 0 (``[0, 1/M]``). A confidence exactly on an
  inner edge ``m/M`` belongs to the bin *below* it; 1.0 belongs to the last bin.
* ``"torchmetrics"``: torchmetrics' ``_binning_bucketize`` (``bucketize(right=True) - 1``):
  left-closed intervals ``[m/M, (m+1)/M)`` and an extra ``M+1``-th slot that holds only
  confidence exactly 1.0. An inner edge ``m/M`` belongs to the bin *above* it. torchmetrics
  computes its edges with ``torch.linspace``, which may differ from ``m / M`` by one ulp at some
  inner edges (platform dependent), and its multiclass wrapper casts confidences to float32;
  this mode applies the same rule in float64 on ``m / M``. On continuous data, away from exact
  edges, both rules give identical metrics.

Empty bins have ``NaN`` mean confidence and accuracy in :class:`BinStats`; they carry no
weight in ECE/RMSCE and are skipped by MCE (torchmetrics writes 0 into both, which gives the
same three numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse
from scipy.special import xlogy

BINNINGS: tuple[str, ...] = ("guo", "torchmetrics")
BINNED_METRICS: tuple[str, ...] = ("ece", "mce", "rmsce")
MEAN_METRICS: tuple[str, ...] = ("accuracy", "confidence", "brier", "nll", "entropy")
METRICS: tuple[str, ...] = MEAN_METRICS[:2] + BINNED_METRICS + MEAN_METRICS[2:]
NLL_FLOOR: float = float(np.finfo(np.float64).tiny)  # smallest positive normal float64
SUM_ATOL: float = 1e-6


@dataclass(frozen=True)
class BinStats:
    """Per-bin statistics of top-label confidence.

    Attributes:
        edges: the ``n_bins + 1`` boundaries ``m / n_bins``.
        count: examples per slot (``n_bins`` slots for "guo", ``n_bins + 1`` for
            "torchmetrics", whose last slot holds confidence exactly 1.0).
        confidence_sum: sum of confidences per slot.
        correct_sum: number of correct predictions per slot.
        mean_confidence: ``confidence_sum / count``; NaN where the slot is empty.
        accuracy: ``correct_sum / count``; NaN where the slot is empty.
        binning: the rule used.
    """

    edges: np.ndarray
    count: np.ndarray
    confidence_sum: np.ndarray
    correct_sum: np.ndarray
    mean_confidence: np.ndarray
    accuracy: np.ndarray
    binning: str

    @property
    def total(self) -> int:
        """Number of examples binned."""
        return int(self.count.sum())

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bound of every slot (the torchmetrics 1.0 slot is ``[1, 1]``)."""
        lower, upper = self.edges[:-1], self.edges[1:]
        if len(self.count) > len(lower):
            lower, upper = np.append(lower, 1.0), np.append(upper, 1.0)
        return lower, upper


def _check_binning(n_bins: int, binning: str) -> None:
    if binning not in BINNINGS:
        raise ValueError(f"unknown binning {binning!r}; accepted: {', '.join(BINNINGS)}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def bin_edges(n_bins: int) -> np.ndarray:
    """The ``n_bins + 1`` equal-width edges ``m / n_bins`` (each correctly rounded)."""
    return np.arange(n_bins + 1, dtype=np.float64) / n_bins


def bin_index(confidence: np.ndarray, n_bins: int, binning: str = "guo") -> np.ndarray:
    """Slot of every confidence (any shape) under a binning rule; see the module docstring."""
    _check_binning(n_bins, binning)
    edges = bin_edges(n_bins)
    if binning == "guo":
        # side="left" makes a value on edge m/M land in the bin below; 0.0 is pulled into bin 0
        return np.maximum(np.searchsorted(edges, confidence, side="left") - 1, 0)
    return np.searchsorted(edges, confidence, side="right") - 1


def _check_confidence(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, ...]:
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct)
    if conf.ndim != 1 or corr.shape != conf.shape:
        raise ValueError(
            f"confidence and correct must be 1-D of equal length, got {conf.shape} and {corr.shape}"
        )
    if conf.size == 0:
        raise ValueError("confidence is empty (N == 0)")
    if not np.all(np.isfinite(conf)) or conf.min() < 0.0 or conf.max() > 1.0:
        raise ValueError("confidence must be finite and within [0, 1]")
    if not np.all((corr == 0) | (corr == 1)):
        raise ValueError("correct must hold only 0/1 or booleans")
    return conf, corr.astype(np.float64)


def bin_statistics(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int, binning: str = "guo"
) -> BinStats:
    """Count, mean confidence and accuracy per confidence bin.

    Args:
        confidence: [N] top-label confidences in [0, 1].
        correct: [N] 0/1 or bool, whether the top label was right.
        n_bins: number of equal-width bins M.
        binning: "guo" or "torchmetrics" (see the module docstring for edge rules).

    Returns:
        BinStats; empty bins have NaN mean confidence and accuracy.
    """
    _check_binning(n_bins, binning)
    conf, corr = _check_confidence(confidence, correct)
    slots = n_bins + (binning == "torchmetrics")
    idx = bin_index(conf, n_bins, binning)
    count = np.bincount(idx, minlength=slots)
    conf_sum = np.bincount(idx, weights=conf, minlength=slots)
    corr_sum = np.bincount(idx, weights=corr, minlength=slots)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        acc = np.where(count > 0, corr_sum / count, np.nan)
    return BinStats(bin_edges(n_bins), count, conf_sum, corr_sum, mean_conf, acc, binning)


def _gaps(stats: BinStats) -> tuple[np.ndarray, np.ndarray]:
    """Weights |B|/N and |acc_b - conf_b| of the non-empty bins."""
    full = stats.count > 0
    weight = stats.count[full] / stats.total
    return weight, np.abs(stats.accuracy[full] - stats.mean_confidence[full])


def ece(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15, binning: str = "guo"
) -> float:
    """Expected calibration error: sum over bins of |B|/N * |acc_B - conf_B|.

    Example:
        Two examples at 0.85 (one right) and two at 0.65 (both right):
        0.5 * |0.5 - 0.85| + 0.5 * |1.0 - 0.65| = 0.35.

        >>> round(ece(np.array([0.85, 0.85, 0.65, 0.65]), np.array([1, 0, 1, 1]), n_bins=10), 12)
        0.35
    """
    weight, gap = _gaps(bin_statistics(confidence, correct, n_bins, binning))
    return float(np.sum(weight * gap))


def mce(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15, binning: str = "guo"
) -> float:
    """Maximum calibration error: the largest |acc_B - conf_B| over non-empty bins."""
    _, gap = _gaps(bin_statistics(confidence, correct, n_bins, binning))
    return float(np.max(gap))


def rms_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15, binning: str = "guo"
) -> float:
    """Root-mean-square calibration error: sqrt(sum |B|/N * (acc_B - conf_B)^2), no debiasing.

    This is what torchmetrics' ``norm="l2"`` computes (its debiased variant is disabled there).
    """
    weight, gap = _gaps(bin_statistics(confidence, correct, n_bins, binning))
    return float(np.sqrt(np.sum(weight * gap**2)))


def softmax64(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax in float64 after subtracting the max (trap 7: fp32 saturates at 1.0).

    Logits of -inf get probability 0; a slice of only -inf yields NaN.
    """
    x = np.asarray(logits, dtype=np.float64)
    z = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return z / np.sum(z, axis=axis, keepdims=True)


def _check_probs(probs: np.ndarray, labels: np.ndarray, ndim: int, sum_atol: float) -> tuple:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != ndim:
        raise ValueError(f"probs must have {ndim} dimensions, got shape {p.shape}")
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"labels must be 1-D with N = {p.shape[0]} entries, got shape {y.shape}")
    if p.shape[0] == 0:
        raise ValueError("no examples (N == 0)")
    if p.shape[-1] < 2:
        raise ValueError(f"need at least 2 options, got K = {p.shape[-1]}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"probs contain {int(np.sum(~np.isfinite(p)))} non-finite values")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"probs must lie in [0, 1], got range [{p.min()}, {p.max()}]")
    worst = float(np.max(np.abs(p.sum(axis=-1) - 1.0)))
    if worst > sum_atol:
        raise ValueError(f"probs rows must sum to 1 (worst deviation {worst:.3g} > {sum_atol})")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= p.shape[-1]:
        raise ValueError(f"labels must lie in [0, {p.shape[-1] - 1}], got [{y.min()}, {y.max()}]")
    return p, y.astype(np.int64)


def _per_example(probs: np.ndarray, labels: np.ndarray, nll_floor: float) -> dict[str, np.ndarray]:
    """Per-example quantities; probs [N, ..., K] and labels [N] -> arrays [N, ...]."""
    y = labels.reshape(labels.shape + (1,) * (probs.ndim - 1))
    onehot = np.arange(probs.shape[-1]) == y
    p_label = np.take_along_axis(probs, y, axis=-1)[..., 0]
    return {
        "confidence": probs.max(axis=-1),
        "accuracy": (probs.argmax(axis=-1) == y[..., 0]).astype(np.float64),
        "brier": np.sum((probs - onehot) ** 2, axis=-1),
        "nll": -np.log(np.maximum(p_label, nll_floor)),
        "entropy": -np.sum(xlogy(probs, probs), axis=-1),
    }


def _metrics_unchecked(
    probs: np.ndarray,
    labels: np.ndarray,
    n_bins: int,
    binning: str,
    extra_bins: Sequence[int],
    nll_floor: float,
) -> dict[str, float]:
    ex = _per_example(probs, labels, nll_floor)
    conf, corr = ex["confidence"], ex["accuracy"]
    out = {"accuracy": float(corr.mean()), "confidence": float(conf.mean())}
    weight, gap = _gaps(bin_statistics(conf, corr, n_bins, binning))
    out["ece"] = float(np.sum(weight * gap))
    out["mce"] = float(np.max(gap))
    out["rmsce"] = float(np.sqrt(np.sum(weight * gap**2)))
    for name in ("brier", "nll", "entropy"):
        out[name] = float(ex[name].mean())
    for n in extra_bins:
        weight, gap = _gaps(bin_statistics(conf, corr, n, binning))
        out[f"ece_{n}"] = float(np.sum(weight * gap))
        out[f"mce_{n}"] = float(np.max(gap))
    return out


def option_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    n_bins: int = 15,
    binning: str = "guo",
    extra_bins: Sequence[int] = (),
    nll_floor: float = NLL_FLOOR,
    sum_atol: float = SUM_ATOL,
) -> dict[str, float]:
    """Accuracy and calibration of option probabilities.

    Args:
        probs: [N, K] probabilities over the K options; rows sum to 1 within ``sum_atol``.
        labels: [N] integer index of the right option.
        n_bins: bins for ece/mce/rmsce.
        binning: "guo" or "torchmetrics".
        extra_bins: further bin counts n, reported as ``ece_{n}`` and ``mce_{n}``.
        nll_floor: p_label is clipped below at this value so NLL stays finite
            (default: the smallest positive normal float64, i.e. NLL <= ~708.4).
        sum_atol: tolerance on the row sums.

    Returns:
        accuracy, confidence (mean max prob), ece, mce, rmsce, brier (multiclass, summed over
        options, in [0, 2]), nll (nats), entropy (nats), then ece_{n}, mce_{n} per extra_bins.
    """
    _check_binning(n_bins, binning)
    for n in extra_bins:
        _check_binning(n, binning)
    p, y = _check_probs(probs, labels, 2, sum_atol)
    return _metrics_unchecked(p, y, n_bins, binning, extra_bins, nll_floor)


def layer_table(
    probs: np.ndarray,
    labels: np.ndarray,
    n_bins: int = 15,
    binning: str = "guo",
    extra_bins: Sequence[int] = (),
    nll_floor: float = NLL_FLOOR,
    sum_atol: float = SUM_ATOL,
) -> pd.DataFrame:
    """One row of :func:`option_metrics` per layer.

    Args:
        probs: [N, L, K] option probabilities at every layer (layer 0 included).
        labels: [N] integer labels.
        n_bins, binning, extra_bins, nll_floor, sum_atol: as in :func:`option_metrics`.

    Returns:
        DataFrame with a ``layer`` column (0..L-1) first, then the option_metrics columns.
    """
    _check_binning(n_bins, binning)
    for n in extra_bins:
        _check_binning(n, binning)
    p, y = _check_probs(probs, labels, 3, sum_atol)
    rows = []
    for layer in range(p.shape[1]):
        row = _metrics_unchecked(p[:, layer], y, n_bins, binning, extra_bins, nll_floor)
        rows.append({"layer": layer, **row})
    return pd.DataFrame(rows)


def _resample_counts(rng: np.random.Generator, n: int, n_rep: int) -> np.ndarray:
    """[n_rep, n] multiplicities of each example in n_rep bootstrap resamples."""
    idx = np.stack([rng.integers(0, n, size=n) for _ in range(n_rep)])
    flat = (np.arange(n_rep)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=n_rep * n).reshape(n_rep, n).astype(np.float64)


def _binned_design(conf: np.ndarray, corr: np.ndarray, n_bins: int, binning: str):
    """Sparse [N, 3*L*S] matrix: per layer and slot, indicator, confidence and correctness."""
    n, n_layers = conf.shape
    slots = n_bins + (binning == "torchmetrics")
    col = np.arange(n_layers) * slots + bin_index(conf, n_bins, binning)  # [N, L]
    width = n_layers * slots
    cols = np.concatenate([col, col + width, col + 2 * width], axis=1).ravel()
    vals = np.concatenate([np.ones_like(conf), conf, corr], axis=1).ravel()
    rows = np.repeat(np.arange(n), 3 * n_layers)
    shape = (n, 3 * width)
    return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=shape), (n_layers, slots)


def _binned_from_sums(sums: np.ndarray, metric: str) -> np.ndarray:
    """ECE/MCE/RMSCE from [B, 3, L, S] sums (count, confidence, correct) -> [B, L]."""
    count, conf_sum, corr_sum = sums[:, 0], sums[:, 1], sums[:, 2]
    total = count.sum(axis=-1)
    gap = np.abs(corr_sum - conf_sum)  # = count * |acc - conf|
    safe = np.maximum(count, 1.0)
    if metric == "ece":
        return gap.sum(axis=-1) / total
    if metric == "mce":
        return np.where(count > 0, gap / safe, -np.inf).max(axis=-1)
    return np.sqrt(np.sum(gap**2 / safe, axis=-1) / total)


def _bootstrap_sums(
    design: scipy.sparse.csr_matrix, shape: tuple[int, int], n_boot: int, seed: int,
    batch_size: int,
):
    """Yield [b, 3, L, S] per-slot sums (count, confidence, correct) of successive batches of
    replicates; replicate b resamples with the b-th ``rng.integers(0, N, size=N)`` draw."""
    n = design.shape[0]
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, batch_size):
        weights = _resample_counts(rng, n, min(batch_size, n_boot - start))
        yield np.asarray(design.T @ weights.T).T.reshape(len(weights), 3, *shape)


def _bootstrap_replicates(
    ex: dict[str, np.ndarray], metric: str, n_boot: int, seed: int, n_bins: int, binning: str,
    batch_size: int,
) -> np.ndarray:
    """[n_boot, L] metric values; all layers share each replicate's resampled examples."""
    if metric in BINNED_METRICS:
        design, shape = _binned_design(ex["confidence"], ex["accuracy"], n_bins, binning)
        batches = _bootstrap_sums(design, shape, n_boot, seed, batch_size)
        return np.concatenate([_binned_from_sums(sums, metric) for sums in batches])
    n = ex[metric].shape[0]
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n_boot, batch_size):
        weights = _resample_counts(rng, n, min(batch_size, n_boot - start))
        out.append(weights @ ex[metric] / n)
    return np.concatenate(out)


def _ece_roots(
    conf: np.ndarray, corr: np.ndarray, n_boot: int, seed: int, n_bins: int, binning: str,
    batch_size: int, margin: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap roots ``ECE* - ECE_world`` [n_boot, L] of the two bootstrap worlds of
    :func:`bootstrap_layer_ci`: bin gaps at the low end, then at the high end of their margin.

    conf, corr: [N, L] top-label confidence and 0/1 correctness.
    """
    n, n_layers = conf.shape
    slots = n_bins + (binning == "torchmetrics")
    size = n_layers * slots
    slot = bin_index(conf, n_bins, binning)  # [N, L]
    cell = np.arange(n_layers) * slots + slot  # [N, L] flat (layer, slot)

    def per_cell(values: np.ndarray, cells: np.ndarray, n_cells: int) -> np.ndarray:
        return np.bincount(cells.ravel(), weights=values.ravel(), minlength=n_cells)

    count = np.bincount(cell.ravel(), minlength=size).reshape(n_layers, slots)
    safe = np.maximum(count, 1.0)
    gap = per_cell(corr - conf, cell, size).reshape(n_layers, slots) / safe  # 0 where empty
    p = (per_cell(corr, cell, size).reshape(n_layers, slots) + 1.0) / (count + 2.0)
    half = margin * np.sqrt(p * (1.0 - p) / safe)  # margin * standard error (add-one p)
    sign = np.where(gap < 0, -1.0, 1.0)
    deltas = (sign * np.maximum(np.abs(gap) - half, 0.0), sign * (np.abs(gap) + half))
    layer = np.arange(n_layers)
    # each world: P(correct) = conf + its bin's gap (clipped); its own binned ECE is the truth
    p_world = [np.clip(conf + d[layer, slot], 0.0, 1.0) for d in deltas]
    truth = [np.abs(per_cell(pw - conf, cell, size).reshape(n_layers, slots)).sum(-1) / n
             for pw in p_world]
    rng = np.random.default_rng(seed)  # the resampling indices, as for every other metric
    rng_y = np.random.default_rng([seed, 1])  # the redrawn correctness
    step = max(1, min(batch_size, _MAX_BOOT_CELLS // (n * n_layers)))
    roots: tuple[list, list] = ([], [])
    for start in range(0, n_boot, step):
        reps = min(step, n_boot - start)
        idx = np.stack([rng.integers(0, n, size=n) for _ in range(reps)])  # [b, N]
        u = np.stack([rng_y.random(n) for _ in range(reps)])[..., None]  # [b, N, 1]
        cells = np.arange(reps)[:, None, None] * size + cell[idx]  # [b, N, L]
        conf_star = conf[idx]
        for pw, t, out in zip(p_world, truth, roots):
            g_star = per_cell((u < pw[idx]) - conf_star, cells, reps * size)
            out.append(np.abs(g_star.reshape(reps, n_layers, slots)).sum(-1) / n - t)
    return np.concatenate(roots[0]), np.concatenate(roots[1])


INTERVAL_METHODS: tuple[str, ...] = ("auto", "percentile", "adjusted")
ECE_MARGIN: float = 3.0
_MAX_BOOT_CELLS: int = 2_000_000  # replicates x examples x layers held at once (ECE interval)


def bootstrap_layer_ci(
    probs: np.ndarray,
    labels: np.ndarray,
    metric: str,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    n_bins: int = 15,
    binning: str = "guo",
    batch_size: int = 200,
    nll_floor: float = NLL_FLOOR,
    sum_atol: float = SUM_ATOL,
    method: str = "auto",
    ece_margin: float = ECE_MARGIN,
) -> pd.DataFrame:
    """Bootstrap confidence interval of one metric at every layer.

    Each replicate resamples N examples with replacement and uses the same indices at every
    layer; replicate b's indices are the b-th ``rng.integers(0, N, size=N)`` draw of
    ``rng = np.random.default_rng(seed)``, so results do not depend on ``batch_size``.

    What the interval covers (``method="auto"``):

    * accuracy, confidence, brier, nll, entropy (means of per-example values, unbiased):
      percentile interval, the ``alpha/2`` and ``1 - alpha/2`` quantiles of the replicates,
      for the population mean. It is widened, if ever needed, to contain the full-data value
      (for a mean this binds only with a handful of replicates).
    * ece (``"adjusted"``): an interval for the *true binned* ECE, ``sum_b P(b) |d_b|`` with
      ``d_b = E[correct - confidence | bin b]`` and the same bins: the quantity the plug-in
      ``ece`` estimates. It is **not** an interval around a debiased estimate; it is reported
      beside the plug-in ``ece`` and always contains it. Why not the percentile interval:
      the plug-in is biased upward (``E|g_b| > |d_b|``, most where a bin is nearly calibrated)
      and a resample's ECE is biased up once more, so the percentile interval sits above the
      truth (coverage 0 for a calibrated model) and can exclude the plug-in itself; the
      basic and BCa bootstraps and a Kumar et al. (2019)-style debiased ECE with a bootstrap
      interval undercover near calibration too (simulated coverage at N = 300: 0.53, 0.0,
      0.74-0.85), because the law of ``ece - truth`` depends on every unknown ``|d_b|``
      and is stochastically largest where ``|d_b|`` is smallest. So the root ``ece - truth``
      is bootstrapped in two worlds that bracket the gaps: with ``g_b`` the observed gap of
      bin b and ``s_b = sqrt(p (1 - p) / n_b)`` its standard error (p the bin's add-one
      accuracy ``(correct + 1) / (n_b + 2)``), world "low" sets every bin's gap to
      ``sign(g_b) max(|g_b| - m s_b, 0)`` and world "high" to ``sign(g_b) (|g_b| + m s_b)``,
      ``m = ece_margin``. A replicate resamples the examples (the indices above, shared with
      every other metric) and redraws each resampled example's correctness as
      Bernoulli(clip(confidence + its world's gap of its bin)) (one uniform per example,
      shared by the layers and both worlds, from ``default_rng([seed, 1])``); its root is its
      ECE minus the world's own binned ECE. With ``q_low(x)``/``q_high(x)`` the x-quantiles of
      the roots in the two worlds:
      ``lo = max(ece - max(q_low(1 - alpha/2), 0), 0)``,
      ``hi = min(ece - min(q_high(alpha/2), 0), 1)``; the clamps encode 0 <= ECE <= 1 and can
      only widen the interval, so ``lo <= ece <= hi`` always.
      Measured on synthetic data of known calibration (K = 4, confidence uniform on
      [1/4, 1], 15 bins, alpha 0.05, n_boot 200, 400 data sets each of N = 100, 300, 1000,
      3000): coverage 0.96-0.98 for a calibrated model, 0.93-0.97 for one overconfident by
      0.2 in every bin, 0.97-1.0 (conservative) where the gaps are comparable to their noise
      (0.05 in every bin, or 0.1 above confidence 0.6), 0.94-1.0 for one underconfident by
      0.15; the percentile interval covered 0.0, 0.87-0.95, 0.0-0.92 and 0.66-0.95 of those,
      and excluded its own plug-in in 18-24% of the calibrated data sets. The adjusted
      interval is 1.0-1.7 times as wide.
    * mce, rmsce: percentile interval of a statistic biased upward like ECE: a measure of
      spread only, not a valid interval for the true value (it may exclude the plug-in).

    Args:
        probs: [N, L, K] option probabilities.
        labels: [N] integer labels.
        metric: one of ``METRICS`` (accuracy, confidence, ece, mce, rmsce, brier, nll, entropy).
        n_boot: number of bootstrap replicates.
        alpha: the interval covers 1 - alpha (alpha/2 on either side).
        seed: seed of the resampling generator.
        n_bins, binning, nll_floor, sum_atol: as in :func:`option_metrics`.
        batch_size: replicates evaluated together (memory ~ batch_size * N floats).
        method: "auto" (the above), "percentile" (plain percentile interval for any metric,
            unclamped; for ECE only as the biased reference), or "adjusted" (ece only).
        ece_margin: ``m`` above, how many standard errors the two bootstrap worlds of the ECE
            interval move each bin's gap from its estimate (larger: wider, more conservative).

    Returns:
        DataFrame with columns layer, <metric> (the full-data plug-in value), lo, hi.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; accepted: {', '.join(METRICS)}")
    if method not in INTERVAL_METHODS:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(INTERVAL_METHODS)}")
    if method == "adjusted" and metric != "ece":
        raise ValueError(f"method 'adjusted' is for ece only, not {metric!r}")
    if n_boot < 1 or batch_size < 1:
        raise ValueError(f"n_boot and batch_size must be >= 1, got {n_boot} and {batch_size}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if not (np.isfinite(ece_margin) and ece_margin >= 0):
        raise ValueError(f"ece_margin must be finite and >= 0, got {ece_margin}")
    _check_binning(n_bins, binning)
    p, y = _check_probs(probs, labels, 3, sum_atol)
    ex = _per_example(p, y, nll_floor)
    table = layer_table(p, y, n_bins, binning, nll_floor=nll_floor, sum_atol=sum_atol)
    point = table[metric].to_numpy()
    if method == "percentile" or (method == "auto" and metric != "ece"):
        reps = _bootstrap_replicates(ex, metric, n_boot, seed, n_bins, binning, batch_size)
        lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2], axis=0)
        if method == "auto" and metric in MEAN_METRICS:
            lo, hi = np.minimum(lo, point), np.maximum(hi, point)
    else:
        low_world, high_world = _ece_roots(ex["confidence"], ex["accuracy"], n_boot, seed,
                                           n_bins, binning, batch_size, float(ece_margin))
        q_hi = np.quantile(low_world, 1 - alpha / 2, axis=0)
        q_lo = np.quantile(high_world, alpha / 2, axis=0)
        lo = np.maximum(point - np.maximum(q_hi, 0.0), 0.0)
        hi = np.minimum(point - np.minimum(q_lo, 0.0), 1.0)  # ECE <= 1
    return pd.DataFrame({"layer": np.arange(p.shape[1]), metric: point, "lo": lo, "hi": hi})
