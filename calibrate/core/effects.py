"""How much an edit moves the output, and what kind of change it is; pure numpy/scipy.

* The **effect** of an edit on option scores (logits ``[..., N, K]``, -inf where an example has
  no option there) against the unedited scores ``[N, K]``: ``kl``, the mean over examples of
  KL(p_edited ‖ p_unedited) = Σ_k p_e,k (log p_e,k − log p_u,k) in nats; ``confidence``, the
  mean |max_k p_e,k − max_k p_u,k|.
* :func:`match_scales`: per direction, the multiple s of η at which its effect equals a target
  (ĉ's effect at η): the random-direction null at a *matched effect* rather than at equal norm.
  A geometric bracket search then bisection in log s; the effect is taken to grow with |η|
  (true of both measures for small edits; where it is not, a root inside the bracket is found).
* :func:`temperature_equivalent`: the single temperature T that best reproduces the edited
  option distribution from the unedited scores, ``argmin_T mean KL(p_edited ‖ softmax(z/T))``,
  and the KL left over: ≈ 0 means the edit acts as a temperature knob.
* :func:`coordinate_shares`: where a unit direction's squared norm sits: on its ``top_k``
  largest coordinates, and on the model's *massive-activation* coordinates (Sun et al. 2024):
  those whose mean |activation| over the given residuals exceeds ``ratio`` times the median
  coordinate's; and the direction with either set zeroed (not rescaled: the rest of it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.optimize import minimize_scalar

from calibrate.core.option_scores import option_log_softmax, option_max, option_sum

EFFECTS = ("kl", "confidence")


def log_probs(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis in float64 (-inf slots stay -inf)."""
    return option_log_softmax(np.asarray(logits, dtype=np.float64))


def example_kl(edited: np.ndarray, base: np.ndarray,
               base_log: np.ndarray | None = None) -> np.ndarray:
    """KL(p_edited ‖ p_base) per example [..., N] in nats (0-probability options add 0);
    ``base_log``: the base's log-probabilities when already computed."""
    log_e = log_probs(edited)
    log_b = log_probs(base) if base_log is None else base_log
    p_e = np.exp(log_e)
    present = p_e > 0
    # Where p_e > 0 the term is p_e * (log p_e - log p_b), log p_b read as 0 where the base has
    # no such option; elsewhere 0. Computed in place in log_e's buffer (the searches call this
    # on [directions, N, K] arrays, whose temporaries cost more than the arithmetic).
    known = np.where(np.isfinite(log_b), log_b, 0.0)
    own = np.broadcast_shapes(log_e.shape, known.shape) == log_e.shape
    term = np.subtract(log_e, known, out=log_e if own else None)
    with np.errstate(invalid="ignore"):  # 0 * -inf where p_e == 0: set to 0 just below
        np.multiply(p_e, term, out=term)
    np.copyto(term, 0.0, where=~present)
    return option_sum(term)


def effect(edited: np.ndarray, base: np.ndarray, kind: str,
           base_log: np.ndarray | None = None) -> np.ndarray:
    """The mean effect over examples of edited scores [..., N, K] against base scores [N, K]:
    ``kl`` (mean KL(p_edited ‖ p_base)) or ``confidence`` (mean |Δ top-label confidence|);
    ``base_log``: the base's log-probabilities when already computed."""
    if kind not in EFFECTS:
        raise ValueError(f"effect {kind!r}; accepted: {', '.join(EFFECTS)}")
    log_b = log_probs(base) if base_log is None else base_log
    if kind == "kl":
        return example_kl(edited, base, log_b).mean(axis=-1)
    top_e = option_max(np.exp(log_probs(edited)))
    top_b = np.exp(log_b).max(axis=-1)
    return np.abs(top_e - top_b).mean(axis=-1)


def match_scales(effect_of: Callable[[np.ndarray, np.ndarray], np.ndarray], target: float,
                 n: int, max_factor: float, rel_tol: float) -> np.ndarray:
    """Per direction d < n, the multiplier s in [1/max_factor, max_factor] of η with
    ``effect_of(s, rows)[i] == target`` for direction ``rows[i]``, to a relative tolerance
    ``rel_tol`` in s; NaN where the effect stays below the target up to ``max_factor`` or
    above it down to ``1/max_factor`` (and everywhere when the target is not positive).

    ``effect_of(scales [m], rows [m])``: the effects of directions ``rows`` edited at ``scales``
    times η. The bracket starts at s = 1 and doubles (or halves) until it straddles the target;
    then bisection at the geometric midpoint until ``hi / lo <= 1 + rel_tol``; the result is
    the geometric midpoint of the last bracket.
    """
    out = np.full(n, np.nan)
    if not target > 0 or n == 0:
        return out
    lo, hi = np.full(n, np.nan), np.full(n, np.nan)
    rows = np.arange(n)
    first = effect_of(np.ones(n), rows)
    up = first < target  # the effect at s = 1 is too small: grow s
    lo[up], hi[~up] = 1.0, 1.0
    for grow, found, start in ((True, hi, up), (False, lo, ~up)):
        active = rows[start]
        step = np.ones(len(active))
        while len(active):
            step = step * 2.0 if grow else step / 2.0
            if (step > max_factor).all() if grow else (step < 1.0 / max_factor).all():
                break
            values = effect_of(step, active)
            done = values >= target if grow else values < target
            found[active[done]] = step[done]
            if not grow:
                hi[active[done]] = step[done] * 2.0
            else:
                lo[active[done]] = step[done] / 2.0
            active, step = active[~done], step[~done]
    ok = rows[np.isfinite(lo) & np.isfinite(hi)]
    a, b = lo[ok], hi[ok]
    while len(ok):
        wide = b / a > 1.0 + rel_tol
        if not wide.any():
            break
        mid = np.sqrt(a[wide] * b[wide])
        values = effect_of(mid, ok[wide])
        below = values < target
        a_w, b_w = a[wide], b[wide]
        a_w[below], b_w[~below] = mid[below], mid[~below]
        a[wide], b[wide] = a_w, b_w
    out[ok] = np.sqrt(a * b)
    return out


def temperature_equivalent(base: np.ndarray, edited: np.ndarray,
                           log_bounds: tuple[float, float]) -> dict[str, float]:
    """The T in ``[exp(lo), exp(hi)]`` minimising mean KL(p_edited ‖ softmax(base / T)) over the
    examples (bounded search in log T), with that KL (``residual_kl``) and the KL at T = 1
    (``kl``, the edit's effect). ``base``/``edited``: option scores [N, K]."""
    base = np.asarray(base, dtype=np.float64)
    edited = np.asarray(edited, dtype=np.float64)

    def loss(log_t: float) -> float:
        return float(example_kl(edited, base / np.exp(log_t)).mean())

    found = minimize_scalar(loss, bounds=log_bounds, method="bounded", options={"xatol": 1e-6})
    return {"temperature": float(np.exp(found.x)), "residual_kl": float(found.fun),
            "kl": loss(0.0)}


def massive_coordinates(residuals: np.ndarray, ratio: float) -> np.ndarray:
    """Coordinates whose mean |activation| over ``residuals`` [M, H] exceeds ``ratio`` × the
    median coordinate's mean |activation| (sorted indices)."""
    magnitude = np.abs(np.asarray(residuals, dtype=np.float64)).mean(axis=0)
    return np.flatnonzero(magnitude > ratio * np.median(magnitude))


def coordinate_shares(direction: np.ndarray, residuals: np.ndarray, top_k: int,
                      ratio: float) -> dict:
    """The share of ``direction``'s squared norm on its ``top_k`` largest |coordinates| and on
    the massive-activation coordinates of ``residuals`` (:func:`massive_coordinates`), with
    those coordinates, their mean |activation| relative to the median coordinate's, and the
    direction with each set zeroed (``without_top_k``, ``without_massive``; not rescaled)."""
    v = np.asarray(direction, dtype=np.float64)
    total = float(v @ v)
    top = np.sort(np.argsort(-np.abs(v), kind="stable")[:top_k])
    massive = massive_coordinates(residuals, ratio)
    magnitude = np.abs(np.asarray(residuals, dtype=np.float64)).mean(axis=0)
    without_top, without_massive = v.copy(), v.copy()
    without_top[top] = 0.0
    without_massive[massive] = 0.0
    return {"top_k": int(top_k), "top_coordinates": top.tolist(),
            "share_top_k": float(v[top] @ v[top]) / total,
            "massive_ratio": float(ratio), "massive_coordinates": massive.tolist(),
            "massive_magnitude": (magnitude[massive] / np.median(magnitude)).tolist(),
            "share_massive": float(v[massive] @ v[massive]) / total,
            "without_top_k": without_top, "without_massive": without_massive}
