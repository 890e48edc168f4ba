"""Top-label calibration errors that depend less on the binning than the equal-width ECE.

All take top-label ``confidence`` [N] in [0, 1] and ``correct`` [N] (0/1) as
:func:`calibrate.core.metrics.ece` does, and are computed per layer by ``layer_table``:

* :func:`adaptive_ece` (``ece_adaptive``): the ECE on ``n_bins`` *equal-mass* bins.
* :func:`debiased_ece` (``ece_debiased``): Kumar et al. (2019)'s debiased estimate of the L2
  (root-mean-square) calibration error on the same equal-mass bins.
* :func:`smooth_ece` (``smece``): the smooth ECE of Błasiok & Nakkiran (2023), relplot's
  ``smECE`` (no bins: a Gaussian kernel whose width is chosen from the data), recomputed here
  with FFT convolutions (equal to relplot's within ~1e-16; the tests compare them).

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


_SEARCH_EPS, _DENSITY_EPS, _MESH = 0.001, 0.0001, 200  # relplot's defaults


def _smooth_at(conf: np.ndarray, residual: np.ndarray, sigma: float) -> float:
    """relplot's ``smooth_ece(f, y, sigma)`` (reflected Gaussian kernel, its default mesh) with
    ``residual`` = f − y: both kernel smoothings (of the residual and of the density) rounded to
    the same grid and convolved at once through the FFT instead of two direct convolutions."""
    t = np.linspace(0, 1, max(round(10 / sigma), _MESH))
    e = max(2000, round(20 / sigma)) // 2 + 1  # grid points of the kernel and the values
    scaled = conf * (e - 1)
    bins = scaled.astype(int).clip(0, e - 2)
    frac = scaled - bins
    values = np.empty((2, e))  # relplot's smooth_round_to_grid of the residual and of ones
    values[0] = np.bincount(bins, weights=(1 - frac) * residual, minlength=e)
    values[1] = np.bincount(bins, weights=1 - frac, minlength=e)
    values[0, 1:] += np.bincount(bins, weights=frac * residual, minlength=e)[:-1]
    values[1, 1:] += np.bincount(bins, weights=frac, minlength=e)[:-1]
    grid = np.linspace(0, 1, e)
    kernel = np.exp(-(grid - 0.5) * (grid - 0.5) / (2 * sigma ** 2)) / (np.sqrt(2 * np.pi) * sigma)
    flipped = values[:, ::-1]
    ext = np.concatenate([flipped[:, :-1], values, flipped[:, 1:]], axis=1)  # reflected ends
    size = 1 << int(np.ceil(np.log2(ext.shape[1] + e - 1)))
    full = np.fft.irfft(np.fft.rfft(ext, size) * np.fft.rfft(kernel, size), size)
    start = e - 1 + e // 2  # np.convolve's "valid" part starts at e - 1; relplot keeps e from e // 2
    smoothed = full[:, start:start + e]
    inds = (t * (e - 1)).astype(int).clip(0, e - 2)  # relplot's linear interpolation at t
    weight = (t - inds * (1 / (e - 1))) / (1 / (e - 1))
    at = smoothed[:, inds] * (1 - weight) + smoothed[:, inds + 1] * weight
    density = at[1] + _DENSITY_EPS
    return float(np.sum(np.abs(at[0] / density) * density) / np.sum(density))


def _smooth(conf: np.ndarray, corr: np.ndarray) -> float:
    """relplot's ``smECE(conf, corr)`` at its default settings (reflected Gaussian kernel, mesh
    200, eps 0.001): the bandwidth sigma = 1 if smECE_1 > 1, else ten bisection steps on
    (0, 1] for the crossing of sigma and smECE_sigma; then smECE at that sigma. The same search
    and arithmetic as relplot 1.0's, with the convolutions through the FFT (equal to relplot
    within ~1e-16, tests/test_calibration_extra.py) and no matplotlib import."""
    conf = np.asarray(conf, dtype=np.float64)
    residual = conf - np.asarray(corr, dtype=np.float64)
    found: dict[float, float] = {}  # smECE_sigma per sigma tried: the final sigma was tried

    def at(sigma: float) -> float:
        if sigma not in found:
            found[sigma] = _smooth_at(conf, residual, sigma)
        return found[sigma]

    def wide_enough(sigma: float) -> bool:
        return sigma < _SEARCH_EPS or sigma < at(sigma)

    sigma: float = 1
    if not wide_enough(1):
        start, end = 1.0, 0.0
        for _ in range(10):
            mid = (start + end) / 2
            if wide_enough(mid):
                end = mid
            else:
                start = mid
        sigma = start
    return at(sigma)


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
    """Smooth ECE (Błasiok & Nakkiran 2023): ``relplot.smECE(confidence, correct)`` at
    relplot's default settings, computed by :func:`_smooth` (reflected Gaussian kernel,
    bandwidth sigma found by bisection so that smECE_sigma ~ sigma). No bins."""
    return _smooth(*_metrics._check_confidence(confidence, correct))


def extra_metrics(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> dict[str, float]:
    """``ece_adaptive``, ``ece_debiased`` (both on ``n_bins`` equal-mass bins) and ``smece`` of
    already validated float64 arrays (as :func:`calibrate.core.metrics.layer_table` holds)."""
    return {
        "ece_adaptive": _adaptive(confidence, correct, n_bins),
        "ece_debiased": _debiased(confidence, correct, n_bins),
        "smece": _smooth(confidence, correct),
    }
