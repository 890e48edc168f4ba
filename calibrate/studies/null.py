"""The random-direction null of a steering job: is ĉ better than a typical random direction?

``direction.n_random`` seeded random unit directions are steered exactly like ĉ (same layer,
position, η and norm convention) on the same evaluation examples. Per η: ĉ's final-layer ΔECE,
ΔMCE and Δaccuracy against η = 0, the null's median and 5–95 % band, and ĉ's empirical p-value
``(1 + #{random ΔECE <= ĉ's ΔECE}) / (1 + n_random)`` (small: ĉ lowers ECE more than random
directions do). Computed without forward passes where the edit is at the last layer, at the last
position, with one token per option (:mod:`calibrate.engine.readout`); elsewhere it is skipped
and metrics.json says why.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from calibrate.core.nullspace import random_unit_vectors
from calibrate.core.paired import binned_errors
from calibrate.engine.lens import option_probabilities
from calibrate.engine.readout import last_layer_logits, last_layer_truncated_logits

NULL_FILE = "null.csv"


def _final_metrics(logits: np.ndarray, labels: np.ndarray, n_bins: int,
                   binning: str) -> dict[str, np.ndarray]:
    """accuracy, ECE, MCE of option logits [..., N, K], vectorised over the leading axes."""
    lead = logits.shape[:-2]
    probs = option_probabilities(logits.reshape(-1, *logits.shape[-2:]))
    conf, right = probs.max(-1), probs.argmax(-1) == labels
    ece, mce = binned_errors(conf, right, n_bins, binning)
    return {"accuracy": right.mean(-1).reshape(lead), "ece": ece.reshape(lead),
            "mce": mce.reshape(lead)}


def null_table(loaded: Any, residual: np.ndarray, option_ids: np.ndarray, labels: np.ndarray,
               direction: np.ndarray, etas: tuple[float, ...], scale: float, n_random: int,
               seed: int, n_bins: int, binning: str) -> pd.DataFrame:
    """One row per η ≠ 0: ĉ's deltas, the null's median and 5–95 % band, the p-value."""
    hidden = residual.shape[1]
    randoms = random_unit_vectors(n_random, hidden, seed).numpy().astype(np.float64)
    vectors = np.vstack([direction[None], randoms])
    logits = last_layer_logits(loaded, residual, option_ids, vectors, np.asarray(etas), scale)
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
        below = int(np.sum(metrics["ece"][1:, e] - metrics["ece"][1:, 0]
                           <= row["c_hat_delta_ece"]))
        row["p_value_ece"] = (1 + below) / (1 + n_random)
        rows.append(row)
    return pd.DataFrame(rows)


def null_skip_reason(layers: list[int], last: int, position: str, cloze: bool) -> str | None:
    """Why the fast null cannot run here, or None when it can."""
    if layers != [last]:
        return f"the edit is at layers {layers}, not only at the last layer {last}"
    if position != "last":
        return "intervention.position=all"
    if cloze:
        return "cloze scoring (continuations read the edited state)"
    return None


def subspace_null(loaded: Any, residual: np.ndarray, option_ids: np.ndarray, labels: np.ndarray,
                  truncated_delta_ece: float, hidden: int, k: int, n_control: int, seed: int,
                  n_bins: int, binning: str, means: np.ndarray | None = None) -> dict[str, Any]:
    """The null-space truncation against ``n_control`` random k-dimensional subspaces removed
    the same way at the last layer: their ΔECE median and 5–95 % band, and the truncation's
    p-value ``(1 + #{random ΔECE <= truncation's}) / (1 + n_control)``."""
    from calibrate.core.subspace import random_subspace

    bases = [random_subspace(hidden, k, seed + s).numpy() for s in range(n_control)]
    logits = last_layer_truncated_logits(loaded, residual, option_ids, bases, means)
    plain = last_layer_logits(loaded, residual, option_ids, np.zeros((1, hidden)), np.zeros(1))
    ece = _final_metrics(logits, labels, n_bins, binning)["ece"]
    ece0 = float(_final_metrics(plain[0], labels, n_bins, binning)["ece"][0])
    delta = ece - ece0
    lo, median, hi = np.quantile(delta, [0.05, 0.5, 0.95])
    below = int(np.sum(delta <= truncated_delta_ece))
    return {"n_control": n_control, "truncation_delta_ece": truncated_delta_ece,
            "control_delta_ece_median": float(median), "control_delta_ece_p05": float(lo),
            "control_delta_ece_p95": float(hi), "p_value_ece": (1 + below) / (1 + n_control)}
