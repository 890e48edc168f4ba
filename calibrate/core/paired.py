"""Paired bootstrap intervals and p-values for the difference between two arms on the same
examples, and the multiple-comparisons correction of the cells that can differ.

A steering arm (η ≠ 0, an ablation, a baseline) and its reference (η = 0) are scored on the
same evaluation examples, so a difference is judged on resamples that draw the *same* examples
for both arms: replicate b uses indices ``rng.integers(0, N, size=N)`` (the b-th draw of
``np.random.default_rng(seed)``) at every layer and in both arms. The interval is the percentile
interval of the replicate differences d*_b, their ``alpha/2`` and ``1 - alpha/2`` quantiles
(``np.quantile``, linear interpolation); the upward bias of a resampled ECE largely cancels in a
paired difference. ``significant_<metric>``: the interval excludes 0.

Only cells that *can* differ are tested: an edit at layer ℓ leaves every layer below ℓ exactly
as it was, so the cells of a study are the arms other than the reference at the layers at and
above the lowest edited layer (``first_layer``). A tested cell gets ``n_boot_tested`` replicates
(the first ``n_boot`` of them are the untested cells' replicates) and the bootstrap p-value of
"the difference is 0", two-sided::

    p = min(1, 2 * min(1 + #{d*_b <= 0}, 1 + #{d*_b >= 0}) / (1 + B))

(the smallest it can be is 2 / (1 + B): with B = 2,000 replicates 0.001). Its adjusted p-value
(``metrics.correction``) is taken over all tested cells of the table, one family per metric:
``holm`` (Holm 1979, step-down; controls the family-wise error), ``bh`` (Benjamini–Hochberg
1995, step-up; controls the false discovery rate), ``bonferroni`` (m · p) or ``none``;
``significant_adjusted_<metric>``: the adjusted p-value is at most ``alpha``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import xlogy

from calibrate.core.metrics import CORRECTIONS, bin_index

METRICS = ("accuracy", "ece", "mce")
_MAX_CELLS = 4_000_000  # replicates x examples held at once (memory only: results do not change)
MORE_METRICS = ("confidence", "entropy")  # mean top-label confidence, mean option entropy


def binned_errors(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15,
                  binning: str = "guo") -> tuple[np.ndarray, np.ndarray]:
    """Top-label ECE and MCE of each row of ``conf``/``correct`` [R, N] at once."""
    rows, n = conf.shape
    size = n_bins + (binning == "torchmetrics")
    cells = (np.arange(rows)[:, None] * size + bin_index(conf, n_bins, binning)).ravel()
    count = np.bincount(cells, minlength=rows * size).reshape(rows, size)
    conf_sum = np.bincount(cells, weights=conf.ravel(), minlength=rows * size).reshape(rows, size)
    hits = np.bincount(cells, weights=correct.ravel().astype(float),
                       minlength=rows * size).reshape(rows, size)
    gap = np.abs(hits - conf_sum) / np.maximum(count, 1)
    return (count * gap).sum(axis=1) / n, np.where(count > 0, gap, 0.0).max(axis=1)


def resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n]: replicate b is the b-th ``rng.integers(0, n, size=n)`` draw of
    ``np.random.default_rng(seed)`` (so the first k replicates of any n_boot >= k agree).

    Drawn as one ``[n_boot, n]`` array (the generator fills it in the same order, so it equals
    the draws one replicate at a time) and kept for the next call with the same arguments:
    every arm and baseline of a job resamples the same rows. Read-only."""
    key = (int(n), int(n_boot), int(seed))
    if key not in _RESAMPLES:
        _RESAMPLES.clear()  # [n_boot, n] int64 (~85 MB at 2,000 x 5,000): hold the latest only
        idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        idx.setflags(write=False)
        _RESAMPLES[key] = idx
    return _RESAMPLES[key]


_RESAMPLES: dict[tuple[int, int, int], np.ndarray] = {}


def _replicate_metrics(probs: np.ndarray, labels: np.ndarray, idx: np.ndarray, n_bins: int,
                       binning: str, metrics: tuple[str, ...] = METRICS) -> dict[str, np.ndarray]:
    """accuracy, ECE, MCE (and, when asked, mean confidence and mean option entropy) [R] of
    ``probs`` [N, K] on each resample ``idx`` [R, N], in chunks of replicates (vectorised within
    a chunk)."""
    conf_all, right_all = probs.max(axis=-1), probs.argmax(axis=-1) == labels
    entropy_all = -xlogy(probs, probs).sum(axis=-1) if "entropy" in metrics else None
    step = max(1, _MAX_CELLS // max(1, idx.shape[1]))
    parts: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    for start in range(0, len(idx), step):
        rows = idx[start:start + step]
        conf, correct = conf_all[rows], right_all[rows]
        ece, mce = binned_errors(conf, correct, n_bins, binning)
        found = {"accuracy": correct.mean(axis=1), "ece": ece, "mce": mce}
        if "confidence" in metrics:
            found["confidence"] = conf.mean(axis=1)
        if entropy_all is not None:
            found["entropy"] = entropy_all[rows].mean(axis=1)
        for m in metrics:
            parts[m].append(found[m])
    return {m: np.concatenate(v) for m, v in parts.items()}


def _reference_metrics(reference: np.ndarray, layer: int, labels: np.ndarray, rows: np.ndarray,
                       seed: int, n_bins: int, binning: str, metrics: tuple[str, ...],
                       memo: dict | None) -> dict[str, np.ndarray]:
    """The reference arm's replicate metrics at ``layer`` (through ``memo`` when given, keyed by
    what they are computed from: the reference column's and labels' bytes, and the resamples,
    which are the first ``len(rows)`` draws of ``seed`` — so a memo shared by mistake cannot
    misserve)."""
    if memo is None:
        return _replicate_metrics(reference[:, layer], labels, rows, n_bins, binning, metrics)
    digest = hashlib.blake2b(repr((reference[:, layer].shape, rows.shape, seed, n_bins, binning,
                                   metrics)).encode(), digest_size=20)
    for part in (reference[:, layer], labels):
        digest.update(np.ascontiguousarray(part).tobytes())
    key = digest.digest()
    if key not in memo:
        memo[key] = _replicate_metrics(reference[:, layer], labels, rows, n_bins, binning,
                                       metrics)
    return memo[key]


def bootstrap_p_value(deltas: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the difference is 0" from replicate differences [B]:
    ``min(1, 2 * min(1 + #{d <= 0}, 1 + #{d >= 0}) / (1 + B))``."""
    deltas = np.asarray(deltas, dtype=np.float64)
    below, above = int(np.sum(deltas <= 0)), int(np.sum(deltas >= 0))
    return min(1.0, 2.0 * min(1 + below, 1 + above) / (1 + len(deltas)))


def adjust_p_values(p: np.ndarray, method: str) -> np.ndarray:
    """Adjusted p-values of one family (NaN entries are not tested and stay NaN)."""
    if method not in CORRECTIONS:
        raise ValueError(f"correction {method!r}; accepted: {', '.join(CORRECTIONS)}")
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    tested = ~np.isnan(p)
    values = p[tested]
    m = len(values)
    if m == 0:
        return out
    if method == "none":
        adjusted = values
    elif method == "bonferroni":
        adjusted = np.minimum(1.0, m * values)
    else:
        order = np.argsort(values, kind="stable")
        ranked = values[order]
        if method == "holm":  # step-down: max over the smaller ones of (m - j + 1) p_(j)
            steps = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * ranked))
        else:  # bh, step-up: min over the larger ones of m / j * p_(j)
            scaled = np.minimum(1.0, m / np.arange(1, m + 1) * ranked)
            steps = np.minimum.accumulate(scaled[::-1])[::-1]
        adjusted = np.empty(m)
        adjusted[order] = steps
    out[tested] = adjusted
    return out


def paired_intervals(reference: np.ndarray, arm: np.ndarray, labels: np.ndarray,
                     n_boot: int = 200, alpha: float = 0.05, seed: int = 0, n_bins: int = 15,
                     binning: str = "guo", tested: Sequence[bool] | None = None,
                     n_boot_tested: int | None = None,
                     metrics: tuple[str, ...] = METRICS,
                     reference_memo: dict | None = None) -> pd.DataFrame:
    """Per layer: the percentile interval of (arm − reference) for accuracy, ECE and MCE (and
    any of :data:`MORE_METRICS` listed in ``metrics``), and whether it excludes 0.
    ``reference``/``arm``: probabilities [N, L, K] on the same examples.

    Layers marked in ``tested`` (default: none) use ``n_boot_tested`` replicates (default
    ``n_boot``) and get the two-sided bootstrap p-value ``p_<metric>`` (NaN elsewhere).
    ``reference_memo``: a dict shared by calls with the same ``reference``, labels and settings
    (several arms against one reference), which then resample the reference once per layer."""
    unknown = [m for m in metrics if m not in METRICS + MORE_METRICS]
    if unknown:
        raise ValueError(f"paired_intervals: unknown metric(s) {unknown}; accepted: "
                         f"{', '.join(METRICS + MORE_METRICS)}")
    if reference.shape != arm.shape or reference.shape[0] != len(labels):
        raise ValueError(f"paired arms need equal shapes [N, L, K] and N labels, got "
                         f"{reference.shape}, {arm.shape} and {len(labels)}")
    n, layers = reference.shape[:2]
    marks = np.zeros(layers, dtype=bool) if tested is None else np.asarray(tested, dtype=bool)
    if marks.shape != (layers,):
        raise ValueError(f"tested needs one flag per layer ({layers}), got {marks.shape}")
    most = max(n_boot, n_boot_tested or n_boot) if marks.any() else n_boot
    idx = resample_indices(n, most, seed)
    out = {f"delta_{m}_{end}": np.empty(layers) for m in metrics for end in ("lo", "hi")}
    p_values = {m: np.full(layers, np.nan) for m in metrics}
    levels = [alpha / 2, 1 - alpha / 2]
    zeros: dict[int, tuple[np.ndarray, float]] = {}  # per number of replicates
    for layer in range(layers):
        rows = idx[:(n_boot_tested or n_boot)] if marks[layer] else idx[:n_boot]
        if np.array_equal(arm[:, layer], reference[:, layer]):
            # the same probabilities (a layer below an edit): every replicate's difference is
            # exactly 0, as computing both arms would give, for every metric; the quantiles and
            # p-value of those zeros are taken once per number of replicates
            if len(rows) not in zeros:
                deltas = np.zeros(len(rows))
                zeros[len(rows)] = (np.quantile(deltas, levels), bootstrap_p_value(deltas))
            (lo, hi), p_zero = zeros[len(rows)]
            for metric in metrics:
                out[f"delta_{metric}_lo"][layer], out[f"delta_{metric}_hi"][layer] = lo, hi
                if marks[layer]:
                    p_values[metric][layer] = p_zero
            continue
        ref = _reference_metrics(reference, layer, labels, rows, seed, n_bins, binning,
                                 metrics, reference_memo)
        new = _replicate_metrics(arm[:, layer], labels, rows, n_bins, binning, metrics)
        for metric in metrics:
            deltas = new[metric] - ref[metric]
            lo, hi = np.quantile(deltas, levels)
            out[f"delta_{metric}_lo"][layer], out[f"delta_{metric}_hi"][layer] = lo, hi
            if marks[layer]:
                p_values[metric][layer] = bootstrap_p_value(deltas)
    table = pd.DataFrame(out)
    for metric in metrics:
        table[f"significant_{metric}"] = (table[f"delta_{metric}_lo"] > 0) | \
            (table[f"delta_{metric}_hi"] < 0)
    for metric in metrics:
        table[f"p_{metric}"] = p_values[metric]
    return table


def add_paired_columns(table: pd.DataFrame, probs: np.ndarray, labels: np.ndarray, column: str,
                       reference: int, n_boot: int, alpha: float, seed: int, n_bins: int,
                       binning: str, first_layer: int = 0, n_boot_tested: int | None = None,
                       correction: str = "none") -> pd.DataFrame:
    """``table`` (one block of layer rows per arm, in the order of ``probs`` [A, N, L, K], with
    a ``layer`` column) with paired intervals of every arm against arm ``reference`` (whose own
    are 0). The cells that can differ — arms other than the reference, layers >= ``first_layer``
    — are ``tested``: ``n_boot_tested`` replicates, a p-value per metric, and its adjusted value
    over all tested cells (``correction``) with the flag at ``alpha``."""
    parts, size = [], len(table) // probs.shape[0]
    memo: dict = {}  # the reference resampled once per layer for every arm
    for index in range(probs.shape[0]):
        block = table.iloc[index * size:(index + 1) * size].reset_index(drop=True)
        marks = (block["layer"].to_numpy() >= first_layer) & (index != reference)
        ci = paired_intervals(probs[reference], probs[index], labels, n_boot, alpha, seed,
                              n_bins, binning, marks, n_boot_tested, reference_memo=memo)
        ci.insert(0, "tested", marks)
        parts.append(pd.concat([block, ci], axis=1))
    out = pd.concat(parts, ignore_index=True)
    return adjust_table(out, alpha, correction)


def adjust_table(table: pd.DataFrame, alpha: float, correction: str) -> pd.DataFrame:
    """``p_adjusted_<metric>`` and ``significant_adjusted_<metric>`` of a table's ``p_<metric>``
    columns (one family per metric: every row with a p-value)."""
    table = table.copy()
    for metric in METRICS:
        if f"p_{metric}" not in table:
            continue
        adjusted = adjust_p_values(table[f"p_{metric}"].to_numpy(dtype=np.float64), correction)
        table[f"p_adjusted_{metric}"] = adjusted
        table[f"significant_adjusted_{metric}"] = np.nan_to_num(adjusted, nan=np.inf) <= alpha
    return table


def multiple_comparisons(table: pd.DataFrame, alpha: float, correction: str,
                         n_boot_tested: int) -> dict[str, Any]:
    """How many cells were tested (the ``tested`` rows: those that can differ), at which
    layers, how many flagged before and after the correction, the false positives expected at
    ``alpha`` without one, the Bonferroni threshold and the smallest p-value B replicates give."""
    tested = table[table["tested"]] if "tested" in table else table.iloc[:0]
    cells = len(tested)
    out: dict[str, Any] = {
        "cells_tested": cells, "alpha": alpha, "correction": correction,
        "layers_tested": sorted({int(x) for x in tested["layer"]}) if cells else [],
        "n_boot_tested": int(n_boot_tested), "p_floor": 2.0 / (1 + n_boot_tested),
        "expected_false_positives": alpha * cells,
        "bonferroni_alpha": alpha / cells if cells else alpha}
    for metric in METRICS:
        flag, adjusted = f"significant_{metric}", f"significant_adjusted_{metric}"
        out[f"flagged_{metric}"] = int(tested[flag].sum()) if cells and flag in tested else 0
        out[f"flagged_adjusted_{metric}"] = \
            int(tested[adjusted].sum()) if cells and adjusted in tested else 0
    return out
