"""Bootstrap confidence intervals of the per-layer metrics of :mod:`calibrate.core.metrics`.

:func:`bootstrap_layer_ci` gives one metric's interval at every layer: a percentile interval
for the means of per-example values, and for ECE an interval for the *true* binned ECE that
always contains the plug-in value (see its docstring). Every replicate resamples the same
examples at every layer; replicate b's indices are the b-th ``rng.integers(0, N, size=N)`` draw
of ``np.random.default_rng(seed)``, whatever the batch size.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse

from calibrate.core.metrics import (
    BINNED_METRICS,
    MEAN_METRICS,
    METRICS,
    NLL_FLOOR,
    SUM_ATOL,
    _check_binning,
    _check_probs,
    _per_example,
    bin_index,
    layer_table,
)

INTERVAL_METHODS: tuple[str, ...] = ("auto", "percentile", "adjusted")
ECE_MARGIN: float = 3.0
_MAX_BOOT_CELLS: int = 2_000_000  # replicates x examples x layers held at once (ECE interval)


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
        n_bins, binning, nll_floor, sum_atol: as in :func:`calibrate.core.metrics.option_metrics`.
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
    table = layer_table(p, y, n_bins, binning, nll_floor=nll_floor, sum_atol=sum_atol,
                        extra_calibration=False)  # only this metric's point values are needed
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
