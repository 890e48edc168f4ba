"""Paired bootstrap intervals for the difference between two arms on the same examples.

A steering arm (η ≠ 0, an ablation, a baseline) and its reference (η = 0) are scored on the
same evaluation examples, so a difference is judged on resamples that draw the *same* examples
for both arms: replicate b uses indices ``rng.integers(0, N, size=N)`` (the b-th draw of
``np.random.default_rng(seed)``) at every layer and in both arms. The interval is the percentile
interval of the replicate differences (the upward bias of a resampled ECE largely cancels in a
paired difference); a difference is called significant at ``alpha`` when its interval excludes 0.
Testing many η × layer cells at one ``alpha`` expects ``alpha`` × cells false positives: the
steering summary reports the count and the Bonferroni threshold beside the flags.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import xlogy

from calibrate.core.metrics import bin_index

METRICS = ("accuracy", "ece", "mce")
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


def _replicate_metrics(probs: np.ndarray, labels: np.ndarray, idx: np.ndarray, n_bins: int,
                       binning: str, metrics: tuple[str, ...] = METRICS) -> dict[str, np.ndarray]:
    """accuracy, ECE, MCE (and, when asked, mean confidence and mean option entropy) [R] of
    ``probs`` [N, K] on each resample ``idx`` [R, N]."""
    conf, correct = probs.max(axis=-1)[idx], (probs.argmax(axis=-1) == labels)[idx]
    ece, mce = binned_errors(conf, correct, n_bins, binning)
    out = {"accuracy": correct.mean(axis=1), "ece": ece, "mce": mce}
    if "confidence" in metrics:
        out["confidence"] = conf.mean(axis=1)
    if "entropy" in metrics:
        out["entropy"] = (-xlogy(probs, probs).sum(axis=-1))[idx].mean(axis=1)
    return out


def paired_intervals(reference: np.ndarray, arm: np.ndarray, labels: np.ndarray,
                     n_boot: int = 200, alpha: float = 0.05, seed: int = 0, n_bins: int = 15,
                     binning: str = "guo", metrics: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """Per layer: the percentile interval of (arm − reference) for accuracy, ECE and MCE (and
    any of :data:`MORE_METRICS` listed in ``metrics``), and whether it excludes 0.
    ``reference``/``arm``: probabilities [N, L, K] on the same examples."""
    unknown = [m for m in metrics if m not in METRICS + MORE_METRICS]
    if unknown:
        raise ValueError(f"paired_intervals: unknown metric(s) {unknown}; accepted: "
                         f"{', '.join(METRICS + MORE_METRICS)}")
    if reference.shape != arm.shape or reference.shape[0] != len(labels):
        raise ValueError(f"paired arms need equal shapes [N, L, K] and N labels, got "
                         f"{reference.shape}, {arm.shape} and {len(labels)}")
    n, layers = reference.shape[:2]
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.integers(0, n, size=n) for _ in range(n_boot)])
    out = {f"delta_{m}_{end}": np.empty(layers) for m in metrics for end in ("lo", "hi")}
    for layer in range(layers):
        ref = _replicate_metrics(reference[:, layer], labels, idx, n_bins, binning, metrics)
        new = _replicate_metrics(arm[:, layer], labels, idx, n_bins, binning, metrics)
        for metric in metrics:
            lo, hi = np.quantile(new[metric] - ref[metric], [alpha / 2, 1 - alpha / 2])
            out[f"delta_{metric}_lo"][layer], out[f"delta_{metric}_hi"][layer] = lo, hi
    table = pd.DataFrame(out)
    for metric in metrics:
        table[f"significant_{metric}"] = (table[f"delta_{metric}_lo"] > 0) | \
            (table[f"delta_{metric}_hi"] < 0)
    return table


def add_paired_columns(table: pd.DataFrame, probs: np.ndarray, labels: np.ndarray, column: str,
                       reference: int, n_boot: int, alpha: float, seed: int, n_bins: int,
                       binning: str) -> pd.DataFrame:
    """``table`` (one block of layer rows per arm, in the order of ``probs`` [A, N, L, K]) with
    paired intervals of every arm against arm ``reference`` (whose own are 0)."""
    parts, size = [], len(table) // probs.shape[0]
    for index in range(probs.shape[0]):
        block = table.iloc[index * size:(index + 1) * size]
        ci = paired_intervals(probs[reference], probs[index], labels, n_boot, alpha, seed,
                              n_bins, binning)
        parts.append(pd.concat([block.reset_index(drop=True), ci], axis=1))
    return pd.concat(parts, ignore_index=True)


def multiple_comparisons(table: pd.DataFrame, column: str, reference_value, alpha: float) -> dict:
    """How many arm × layer cells were tested, how many flagged, and the Bonferroni threshold."""
    tested = table[table[column] != reference_value]
    cells = len(tested)
    return {"cells_tested": cells, "alpha": alpha,
            "flagged_ece": int(tested["significant_ece"].sum()) if cells else 0,
            "expected_false_positives": alpha * cells,
            "bonferroni_alpha": alpha / cells if cells else alpha}
