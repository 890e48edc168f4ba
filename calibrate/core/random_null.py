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

from calibrate.core.effects import effect
from calibrate.core.nullspace import random_unit_vectors
from calibrate.core.option_scores import option_argmax, option_max, option_probabilities
from calibrate.core.paired import binned_errors


def final_metrics(logits: np.ndarray, labels: np.ndarray, n_bins: int,
                   binning: str) -> dict[str, np.ndarray]:
    """accuracy, ECE, MCE of option logits [..., N, K], vectorised over the leading axes."""
    lead = logits.shape[:-2]
    probs = option_probabilities(logits.reshape(-1, *logits.shape[-2:]))
    conf, right = option_max(probs), option_argmax(probs) == labels
    ece, mce = binned_errors(conf, right, n_bins, binning)
    return {"accuracy": right.mean(-1).reshape(lead), "ece": ece.reshape(lead),
            "mce": mce.reshape(lead)}


TAILS = ("low", "high", "two")
NULLS = ("isotropic", "covariance")


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


def covariance_vectors(residuals: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` seeded unit directions drawn from N(0, Σ), Σ the covariance of ``residuals``
    [M, H] (rows: examples): ``z @ (X − mean)`` / √(M − 1) with z ~ N(0, I_M) rows of
    ``default_rng(seed).standard_normal((n, M))`` has exactly that law (no eigendecomposition
    of Σ, which is singular when M < H), then each row is scaled to unit norm."""
    x = np.asarray(residuals, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need residuals [M >= 2, H], got shape {x.shape}")
    centred = x - x.mean(axis=0)
    z = np.random.default_rng(seed).standard_normal((n, len(x)))
    draws = z @ centred / np.sqrt(len(x) - 1)
    return draws / np.linalg.norm(draws, axis=1, keepdims=True)


_final_metrics = final_metrics  # the name tests and older callers use


def null_vectors(direction: np.ndarray, n_random: int, seed: int, kind: str = "isotropic",
                 residuals: np.ndarray | None = None) -> np.ndarray:
    """ĉ followed by ``n_random`` seeded random unit directions: [1 + n_random, hidden];
    ``isotropic`` (uniform on the sphere) or ``covariance`` (:func:`covariance_vectors` of
    ``residuals``)."""
    if kind == "covariance":
        if residuals is None:
            raise ValueError("the covariance null needs the residuals it is drawn from")
        randoms = covariance_vectors(residuals, n_random, seed)
    elif kind == "isotropic":
        randoms = random_unit_vectors(n_random, direction.shape[-1], seed).numpy()
    else:
        raise ValueError(f"null {kind!r}; accepted: {', '.join(NULLS)}")
    return np.vstack([np.asarray(direction, dtype=np.float64)[None], randoms.astype(np.float64)])


def direction_null(logits: np.ndarray, labels: np.ndarray, etas: tuple[float, ...],
                   n_bins: int, binning: str, effect_kind: str | None = None) -> pd.DataFrame:
    """One row per η ≠ 0 from final-layer option logits [1 + n_random, E, N, K] (ĉ first):
    ĉ's deltas against η = 0, the null's median and 5–95 % band, the p-values (one-sided,
    ``p_value_ece``, and two-sided) and their resolution 1 / (1 + n_random); with
    ``effect_kind`` (:func:`calibrate.core.effects.effect`) ĉ's effect and the null's median
    effect at the same η (equal norm)."""
    n_random = logits.shape[0] - 1
    metrics = final_metrics(logits, labels, n_bins, binning)  # each [D, E]
    zero = list(etas).index(0.0)
    rows = []
    for e, eta in enumerate(etas):
        if eta == 0.0:
            continue
        row: dict[str, Any] = {"eta": eta, "n_random": n_random}
        for name, values in metrics.items():
            delta = values[:, e] - values[:, zero]  # against eta = 0 (the same for every direction)
            row[f"c_hat_delta_{name}"] = float(delta[0])
            lo, median, hi = np.quantile(delta[1:], [0.05, 0.5, 0.95])
            row.update({f"null_delta_{name}_median": float(median),
                        f"null_delta_{name}_p05": float(lo), f"null_delta_{name}_p95": float(hi)})
        null = metrics["ece"][1:, e] - metrics["ece"][1:, zero]
        row["p_value_ece"] = empirical_p(row["c_hat_delta_ece"], null, "low")
        row["p_value_ece_two_sided"] = empirical_p(row["c_hat_delta_ece"], null, "two")
        row["p_resolution"] = 1.0 / (1 + n_random)
        if effect_kind is not None:
            moved = effect(logits[:, e], logits[0, zero], effect_kind)  # [D]
            row["effect"] = effect_kind
            row["c_hat_effect"] = float(moved[0])
            row["null_effect_median"] = float(np.median(moved[1:]))
        rows.append(row)
    return pd.DataFrame(rows)


def matched_null(c_hat_delta_ece: float, matched: np.ndarray, base: np.ndarray,
                 scales: np.ndarray, labels: np.ndarray, n_bins: int,
                 binning: str) -> dict[str, Any]:
    """ĉ's ΔECE against random directions each steered at the η that matches ĉ's effect:
    ``matched`` [R, N, K] their final-layer option logits there (rows of a direction that could
    not be matched: NaN, left out), ``base`` [N, K] the unsteered logits, ``scales`` [R] each
    matched η as a multiple of ĉ's. The matched null's median and 5–95 % band of ΔECE and
    Δaccuracy, the p-values (one-sided and two-sided) and their resolution."""
    ok = ~np.isnan(scales)
    out: dict[str, Any] = {"n_matched": int(ok.sum()), "n_unmatched": int((~ok).sum())}
    if not ok.any():
        return out
    values = final_metrics(matched[ok], labels, n_bins, binning)
    before = final_metrics(base[None], labels, n_bins, binning)
    for name in ("ece", "accuracy"):
        delta = values[name] - before[name][0]
        lo, median, hi = np.quantile(delta, [0.05, 0.5, 0.95])
        out.update({f"matched_delta_{name}_median": float(median),
                    f"matched_delta_{name}_p05": float(lo),
                    f"matched_delta_{name}_p95": float(hi)})
        if name == "ece":
            out["p_matched_ece"] = empirical_p(c_hat_delta_ece, delta, "low")
            out["p_matched_ece_two_sided"] = empirical_p(c_hat_delta_ece, delta, "two")
    out["matched_scale_median"] = float(np.median(scales[ok]))
    out["p_matched_resolution"] = 1.0 / (1 + int(ok.sum()))
    return out


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
    ece = final_metrics(logits, labels, n_bins, binning)["ece"]
    ece0 = float(final_metrics(plain[None], labels, n_bins, binning)["ece"][0])
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
