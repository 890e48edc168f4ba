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

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import xlogy

from calibrate import values
from calibrate.core import (
    calibration_extra,  # module access: it imports this one
    selective,
)
from calibrate.errors import ConfigError

BINNINGS: tuple[str, ...] = ("guo", "torchmetrics")
CORRECTIONS: tuple[str, ...] = ("holm", "bh", "bonferroni", "none")  # see core.paired


@dataclass
class MetricSettings:
    """The ``metrics`` group: binning, extra bin counts, bootstrap intervals, the paired
    intervals' replicates where a flag is decided and their multiple-comparisons correction."""

    n_bins: int = 15
    binning: str = "guo"
    extra_bins: tuple[int, ...] = (10,)
    bootstrap: int = 0
    alpha: float = 0.05
    seed: int = 0
    ece_margin: float = 3.0
    paired_bootstrap: int = 2000  # replicates of a paired interval at a tested cell (a flag)
    correction: str = "holm"  # holm | bh | bonferroni | none, over the tested cells

    def __post_init__(self) -> None:
        values.integer("metrics.n_bins", self.n_bins, 1)
        values.choice("metrics.binning", self.binning, BINNINGS)
        if isinstance(self.extra_bins, (str, bytes)) or not isinstance(self.extra_bins, Sequence):
            raise ConfigError(f"metrics.extra_bins={self.extra_bins!r}; accepted: a list of "
                              "integers >= 1")
        self.extra_bins = tuple(values.integer("metrics.extra_bins[]", b, 1)
                                for b in self.extra_bins)
        values.integer("metrics.bootstrap", self.bootstrap, 0)
        values.number("metrics.alpha", self.alpha, lambda a: 0 < a < 1,
                      "a number strictly between 0 and 1")
        values.integer("metrics.seed", self.seed, 0)
        values.number("metrics.ece_margin", self.ece_margin, lambda m: m >= 0, "a number >= 0")
        values.integer("metrics.paired_bootstrap", self.paired_bootstrap, 1)
        values.choice("metrics.correction", self.correction, CORRECTIONS)
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


def _check_bins(n_bins: int, binning: str, extra_bins: Sequence[int]) -> None:
    for n in (n_bins, *extra_bins):
        _check_binning(n, binning)


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


def _metrics_unchecked(probs: np.ndarray, labels: np.ndarray, n_bins: int, binning: str,
                       extra_bins: Sequence[int], nll_floor: float,
                       extra_calibration: bool = True) -> dict[str, float]:
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
    if extra_calibration:
        out.update(_extras(conf, corr, n_bins))
    return out


_EXTRAS: dict[bytes, dict[str, float]] = {}
_EXTRAS_HELD = 1024


def _extras(conf: np.ndarray, corr: np.ndarray, n_bins: int) -> dict[str, float]:
    """ece_adaptive, ece_debiased, smece, aurc and eaurc of float64 ``conf``/``corr``, through a
    small in-process memo keyed by their bytes and ``n_bins``: a job measures many layers twice
    (its report, and the unsteered arm of a sweep, whose layers below an edit are unchanged) and
    smECE's bandwidth search is the costly part of a row; equal inputs give equal values."""
    digest = hashlib.blake2b(repr((conf.shape, conf.dtype.str, corr.dtype.str, n_bins)).encode(),
                             digest_size=20)
    digest.update(np.ascontiguousarray(conf).tobytes())
    digest.update(np.ascontiguousarray(corr).tobytes())
    key = digest.digest()
    found = _EXTRAS.get(key)
    if found is None:
        found = calibration_extra.extra_metrics(conf, corr, n_bins)
        found["aurc"] = selective.aurc(conf, corr)
        found["eaurc"] = found["aurc"] - selective.optimal_aurc(corr)
        if len(_EXTRAS) >= _EXTRAS_HELD:
            _EXTRAS.pop(next(iter(_EXTRAS)))
        _EXTRAS[key] = found
    return dict(found)


def option_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    n_bins: int = 15,
    binning: str = "guo",
    extra_bins: Sequence[int] = (),
    nll_floor: float = NLL_FLOOR,
    sum_atol: float = SUM_ATOL,
    extra_calibration: bool = True,
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
        extra_calibration: also ece_adaptive, ece_debiased (``n_bins`` equal-mass bins) and
            smece, see :mod:`calibrate.core.calibration_extra` (smece: ~10-50 ms at N = 14k),
            and the selective-prediction areas aurc and eaurc (:mod:`calibrate.core.selective`).

    Returns:
        accuracy, confidence (mean max prob), ece, mce, rmsce, brier (multiclass, summed over
        options, in [0, 2]), nll (nats), entropy (nats), then ece_{n}, mce_{n} per extra_bins,
        then ece_adaptive, ece_debiased, smece.
    """
    _check_bins(n_bins, binning, extra_bins)
    p, y = _check_probs(probs, labels, 2, sum_atol)
    return _metrics_unchecked(p, y, n_bins, binning, extra_bins, nll_floor, extra_calibration)


def layer_table(
    probs: np.ndarray,
    labels: np.ndarray,
    n_bins: int = 15,
    binning: str = "guo",
    extra_bins: Sequence[int] = (),
    nll_floor: float = NLL_FLOOR,
    sum_atol: float = SUM_ATOL,
    extra_calibration: bool = True,
) -> pd.DataFrame:
    """One row of :func:`option_metrics` per layer.

    Args:
        probs: [N, L, K] option probabilities at every layer (layer 0 included).
        labels: [N] integer labels.
        n_bins, binning, extra_bins, nll_floor, sum_atol, extra_calibration: as in
            :func:`option_metrics`.

    Returns:
        DataFrame with a ``layer`` column (0..L-1) first, then the option_metrics columns.
    """
    _check_bins(n_bins, binning, extra_bins)
    p, y = _check_probs(probs, labels, 3, sum_atol)
    rows = []
    for layer in range(p.shape[1]):
        row = _metrics_unchecked(p[:, layer], y, n_bins, binning, extra_bins, nll_floor,
                                 extra_calibration)
        rows.append({"layer": layer, **row})
    return pd.DataFrame(rows)
