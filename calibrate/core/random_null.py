"""The random-direction null of a steering job: is ĉ better than a typical random direction?

``direction.n_random`` seeded random unit directions are steered exactly like ĉ (same layer,
position, η and norm convention) on the same evaluation examples. Per η: ĉ's final-layer ΔECE,
ΔMCE and Δaccuracy against η = 0, the null's median and 5–95 % band, and ĉ's empirical p-value
``(1 + #{random ΔECE <= ĉ's ΔECE}) / (1 + n_random)`` (small: ĉ lowers ECE more than random
directions do). At the last layer it needs no forward pass (:mod:`calibrate.engine.last_layer`); at
earlier layers every direction and η runs only the blocks above the edit, for the last position
(:mod:`calibrate.engine.upper`). Cloze scoring edited at the last layer rereads only the
context's last state (:mod:`calibrate.engine.cloze_steer`). With ``position=all``, or cloze
scoring edited below the last layer, it is skipped and metrics.json says why.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from calibrate.core.nullspace import random_unit_vectors
from calibrate.core.option_scores import option_probabilities
from calibrate.core.paired import binned_errors


def _final_metrics(logits: np.ndarray, labels: np.ndarray, n_bins: int,
                   binning: str) -> dict[str, np.ndarray]:
    """accuracy, ECE, MCE of option logits [..., N, K], vectorised over the leading axes."""
    lead = logits.shape[:-2]
    probs = option_probabilities(logits.reshape(-1, *logits.shape[-2:]))
    conf, right = probs.max(-1), probs.argmax(-1) == labels
    ece, mce = binned_errors(conf, right, n_bins, binning)
    return {"accuracy": right.mean(-1).reshape(lead), "ece": ece.reshape(lead),
            "mce": mce.reshape(lead)}


TAILS = ("low", "high", "two")


def empirical_p(value: float, null: np.ndarray, tail: str = "low") -> float:
    """ĉ's empirical p-value against ``n`` null draws (NaN draws are left out), counting ĉ as
    one of the draws: ``low`` ``(1 + #{null <= value}) / (1 + n)`` (small: ĉ lowers the metric
    more than the null does), ``high`` ``(1 + #{null >= value}) / (1 + n)``, ``two``
    ``min(1, 2 * min(low, high))``. The smallest one-sided value is ``1 / (1 + n)``."""
    null = np.asarray(null, dtype=np.float64)
    null = null[~np.isnan(null)]
    low = (1 + int(np.sum(null <= value))) / (1 + len(null))
    high = (1 + int(np.sum(null >= value))) / (1 + len(null))
    if tail == "low":
        return low
    if tail == "high":
        return high
    if tail == "two":
        return min(1.0, 2.0 * min(low, high))
    raise ValueError(f"tail {tail!r}; accepted: {', '.join(TAILS)}")


def null_vectors(direction: np.ndarray, n_random: int, seed: int) -> np.ndarray:
    """ĉ followed by ``n_random`` seeded random unit directions: [1 + n_random, hidden]."""
    randoms = random_unit_vectors(n_random, direction.shape[-1], seed).numpy()
    return np.vstack([np.asarray(direction, dtype=np.float64)[None], randoms.astype(np.float64)])


def direction_null(logits: np.ndarray, labels: np.ndarray, etas: tuple[float, ...],
                   n_bins: int, binning: str) -> pd.DataFrame:
    """One row per η ≠ 0 from final-layer option logits [1 + n_random, E, N, K] (ĉ first):
    ĉ's deltas against η = 0, the null's median and 5–95 % band, the p-value."""
    n_random = logits.shape[0] - 1
    metrics = _final_metrics(logits, labels, n_bins, binning)  # each [D, E]
    rows = []
    for e, eta in enumerate(etas):
        if eta == 0.0:
            continue
        row: dict[str, Any] = {"eta": eta, "n_random": n_random}
        for name, values in metrics.items():
            delta = values[:, e] - values[:, 0]  # against eta = 0 (the same for every direction)
            row[f"c_hat_delta_{name}"] = float(delta[0])
            lo, median, hi = np.quantile(delta[1:], [0.05, 0.5, 0.95])
            row.update({f"null_delta_{name}_median": float(median),
                        f"null_delta_{name}_p05": float(lo), f"null_delta_{name}_p95": float(hi)})
        null = metrics["ece"][1:, e] - metrics["ece"][1:, 0]
        row["p_value_ece"] = empirical_p(row["c_hat_delta_ece"], null, "low")
        row["p_value_ece_two_sided"] = empirical_p(row["c_hat_delta_ece"], null, "two")
        row["p_resolution"] = 1.0 / (1 + n_random)
        rows.append(row)
    return pd.DataFrame(rows)


def null_skip_reason(position: str, cloze: bool, last_layer_only: bool) -> str | None:
    """Why the null is not run here (one pass per random direction and η would be needed), or
    None when it runs."""
    if position != "last":
        return "intervention.position=all (a full forward pass per random direction and eta)"
    if cloze and not last_layer_only:
        return ("cloze scoring with an edit below the last layer (every random direction and "
                "eta reruns the continuations)")
    return None


def subspace_null(logits: np.ndarray, plain: np.ndarray, labels: np.ndarray,
                  truncated_delta_ece: float, n_bins: int, binning: str) -> dict[str, Any]:
    """The null-space truncation against random k-dimensional subspaces removed the same way:
    final-layer option logits [n_control, N, K] of the removals and [N, K] of no removal. Their
    ΔECE median and 5–95 % band, and the truncation's p-value
    ``(1 + #{random ΔECE <= truncation's}) / (1 + n_control)``."""
    ece = _final_metrics(logits, labels, n_bins, binning)["ece"]
    ece0 = float(_final_metrics(plain[None], labels, n_bins, binning)["ece"][0])
    delta = ece - ece0
    lo, median, hi = np.quantile(delta, [0.05, 0.5, 0.95])
    return {"n_control": len(logits), "truncation_delta_ece": truncated_delta_ece,
            "control_delta_ece_median": float(median), "control_delta_ece_p05": float(lo),
            "control_delta_ece_p95": float(hi),
            "p_value_ece": empirical_p(truncated_delta_ece, delta, "low"),
            "p_value_ece_two_sided": empirical_p(truncated_delta_ece, delta, "two"),
            "p_resolution": 1.0 / (1 + len(logits))}


def random_bases(hidden: int, k: int, n_control: int, seed: int) -> list[np.ndarray]:
    """``n_control`` seeded random k-dimensional orthonormal bases [hidden, k]."""
    from calibrate.core.subspace import random_subspace

    return [random_subspace(hidden, k, seed + s).numpy() for s in range(n_control)]
