"""Top-label calibration errors that depend less on the binning than the equal-width ECE.

All take top-label ``confidence`` [N] in [0, 1] and ``correct`` [N] (0/1) as
:func:`calibrate.core.metrics.ece` does, and are computed per layer by ``layer_table``:

* :func:`adaptive_ece` (``ece_adaptive``): the ECE on ``n_bins`` *equal-mass* bins.
* :func:`debiased_ece` (``ece_debiased``): Kumar et al. (2019)'s debiased estimate of the L2
  (root-mean-square) calibration error on the same equal-mass bins.
* :func:`smooth_ece` (``smece``): the smooth ECE of Błasiok & Nakkiran (2023), from the
  ``relplot`` package (no bins: a Gaussian kernel whose width is chosen from the data).

Equal-mass bins (:func:`equal_mass_bins`): example i goes to bin ``floor(M * r_i / N)``, where
``r_i`` is the number of examples with a strictly smaller confidence. Without ties the bins hold
``floor(N/M)`` or ``ceil(N/M)`` examples each and are contiguous in confidence; tied confidences
always share a bin (that of their first rank), so a bin can be larger, and another empty (empty
bins are skipped). The result does not depend on the order of the examples.
"""

from __future__ import annotations

import numpy as np

from calibrate.core import metrics as _metrics  # module access: metrics imports this one

EXTRA_METRICS: tuple[str, ...] = ("ece_adaptive", "ece_debiased", "smece")


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def equal_mass_bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-mass bin index (0..n_bins-1) of every confidence; see the module docstring."""
    _check_n_bins(n_bins)
    conf = np.asarray(confidence, dtype=np.float64)
    below = np.searchsorted(np.sort(conf), conf, side="left")  # examples strictly below
    return below * n_bins // conf.size


def _equal_mass_stats(conf: np.ndarray, corr: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    """Count, mean confidence and accuracy of the non-empty equal-mass bins."""
    idx = equal_mass_bins(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    full = count > 0
    n_b = count[full].astype(np.float64)
    mean_conf = np.bincount(idx, weights=conf, minlength=n_bins)[full] / n_b
    acc = np.bincount(idx, weights=corr, minlength=n_bins)[full] / n_b
    return n_b, mean_conf, acc


def _adaptive(conf: np.ndarray, corr: np.ndarray, n_bins: int) -> float:
    n_b, mean_conf, acc = _equal_mass_stats(conf, corr, n_bins)
    return float(np.sum(n_b / conf.size * np.abs(acc - mean_conf)))


def _debiased(conf: np.ndarray, corr: np.ndarray, n_bins: int) -> float:
    n_b, mean_conf, acc = _equal_mass_stats(conf, corr, n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        term = (acc - mean_conf) ** 2 - acc * (1.0 - acc) / (n_b - 1.0)
    term = np.where(n_b >= 2, term, 0.0)  # a single-example bin has no estimate: it adds 0
    return float(np.sqrt(max(np.sum(n_b / conf.size * term), 0.0)))


def _smooth(conf: np.ndarray, corr: np.ndarray) -> float:
    import relplot  # lazy: importing it loads matplotlib, seaborn and scikit-learn (~1.5 s)

    # smECE reads module-level settings; pin relplot's defaults so a plot setting elsewhere
    # (e.g. logit scaling) cannot change the metric
    saved = relplot.config.use_logit_scaling, relplot.config.smECE_mesh_pts
    relplot.config.use_logit_scaling, relplot.config.smECE_mesh_pts = False, 200
    try:
        return float(relplot.smECE(conf, corr))
    finally:
        relplot.config.use_logit_scaling, relplot.config.smECE_mesh_pts = saved


def adaptive_ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE on equal-mass bins: sum over bins of |B|/N * |acc_B - conf_B| (Nixon et al. 2019's
    adaptive calibration error, top-label).

    Example:
        Six examples, three bins of two: gaps |0.5 - 0.25|, |0.5 - 0.65|, |1 - 0.925|, each of
        weight 1/3: (0.25 + 0.15 + 0.075) / 3 = 0.158333...

        >>> conf = np.array([0.2, 0.3, 0.6, 0.7, 0.9, 0.95])
        >>> round(adaptive_ece(conf, np.array([0, 1, 1, 0, 1, 1]), n_bins=3), 12)
        0.158333333333
    """
    _check_n_bins(n_bins)
    return _adaptive(*_metrics._check_confidence(confidence, correct), n_bins)


def debiased_ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """Debiased L2 calibration error on equal-mass bins (Kumar, Liang & Ma 2019, "Verified
    uncertainty calibration", their ``unbiased_l2_ce``, top-label).

    What it estimates: the binned root-mean-square calibration error
    ``sqrt(sum_B P(B) * (E[correct | B] - conf_B)^2)`` of the equal-mass bins, i.e. what
    ``rmsce`` would be on these bins with infinite data. The plug-in ``(acc_B - conf_B)^2``
    overestimates each squared gap by the variance of ``acc_B``; ``acc_B (1 - acc_B) / (n_B - 1)``
    is an unbiased estimate of that variance when the outcomes in a bin are i.i.d. Bernoulli,
    so ``S = sum_B n_B/N * [(acc_B - conf_B)^2 - acc_B (1 - acc_B) / (n_B - 1)]`` is unbiased
    for the squared error (bins with one example add 0, as in Kumar et al.'s code). The value
    returned is ``sqrt(max(S, 0))``: 0 when the data cannot tell the model from a calibrated
    one; neither it nor the square root is exactly unbiased. It is on the L2 scale: for a
    constant gap d it is d, otherwise at least the L1 error of the same bins.

    Example:
        Three bins of three: gaps 0.8, 1/6, 2/15; variance terms 0, 1/9, 1/9:
        S = (0.64 + 1/36 - 1/9 + 4/225 - 1/9) / 3 = 139/900, value sqrt(139) / 30.

        >>> conf = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
        >>> correct = np.array([1, 1, 1, 0, 0, 1, 1, 1, 0])
        >>> bool(abs(debiased_ece(conf, correct, n_bins=3) - np.sqrt(139) / 30) < 1e-12)
        True
    """
    _check_n_bins(n_bins)
    return _debiased(*_metrics._check_confidence(confidence, correct), n_bins)


def smooth_ece(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Smooth ECE (Błasiok & Nakkiran 2023): ``relplot.smECE(confidence, correct)`` with
    relplot's default settings (reflected Gaussian kernel, bandwidth sigma found by bisection so
    that smECE_sigma ~ sigma). No bins; ~10-50 ms for 14,042 examples."""
    return _smooth(*_metrics._check_confidence(confidence, correct))


def extra_metrics(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> dict[str, float]:
    """``ece_adaptive``, ``ece_debiased`` (both on ``n_bins`` equal-mass bins) and ``smece`` of
    already validated float64 arrays (as :func:`calibrate.core.metrics.layer_table` holds)."""
    return {
        "ece_adaptive": _adaptive(confidence, correct, n_bins),
        "ece_debiased": _debiased(confidence, correct, n_bins),
        "smece": _smooth(confidence, correct),
    }
