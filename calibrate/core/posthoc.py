"""Post-hoc recalibration of option scores: the baselines a calibration direction must beat.

Pure functions on option logits ``[N, K]`` (``-inf`` where an example has fewer options) and
labels ``[N]``; fit on one split, apply to another.

* Temperature scaling (Guo et al. 2017): one T > 0 minimising the NLL of ``softmax(logits / T)``,
  a bounded scalar search in log T.
* Histogram binning (Zadrozny & Elkan 2001), top-label: the top-label confidence is replaced by
  the calibration split's accuracy in its equal-width bin (bins the split leaves empty keep the
  confidence); the other options share the rest of the mass in their original proportions.
* Per-option bias (contextual calibration, Zhao et al. 2021): ``z + b`` with
  ``b_k = −log p̄_k``, p̄ the calibration split's mean option distribution standing for the
  content-free prompt's (as batch calibration, Zhou et al. 2024, estimates it): every option
  gets the same average probability. No labels are used.
* Vector scaling (Guo et al. 2017): ``w ⊙ z + b`` per option slot, (w, b) minimising the NLL
  (L-BFGS from w = 1, b = 0, analytic gradient).
* Isotonic regression (Zadrozny & Elkan 2002), top-label: the top-label confidence is replaced
  by a non-decreasing fit of correctness on confidence (scikit-learn's ``IsotonicRegression``,
  clipped to the fitted range); the other options share the rest as in histogram binning.
* Late-layer ensemble (after Zhou et al. 2025, "Beyond the Final Layer"): at layer ℓ, the mean
  of the option probabilities of layers ℓ−m+1 … ℓ, m ≤ ``baselines.ensemble_max_layers`` chosen
  by the calibration split's NLL (the parameter is m).

:func:`baseline_table` also gives every method's paired interval against the raw model at one
layer (the steered layer; the last for the baselines study), its p-value and the
multiple-comparisons correction over the methods (:mod:`calibrate.core.paired`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize, minimize_scalar
from scipy.special import softmax

from calibrate import values
from calibrate.core.metrics import NLL_FLOOR, MetricSettings, bin_index, layer_table
from calibrate.core.option_scores import option_log_softmax, option_probabilities
from calibrate.core.paired import METRICS as PAIRED
from calibrate.core.paired import adjust_table, paired_intervals
from calibrate.errors import ConfigError

METHODS = ("temperature", "histogram", "bias", "vector", "isotonic", "ensemble")


@dataclass
class BaselineSettings:
    """The ``baselines`` group: which post-hoc methods, the temperature search interval and the
    late-layer ensemble's largest window."""

    methods: tuple[str, ...] = METHODS
    log_t_bounds: tuple[float, float] = (-5.0, 5.0)
    ensemble_max_layers: int = 8

    def __post_init__(self) -> None:
        methods = self.methods
        if isinstance(methods, str) or not methods or any(m not in METHODS for m in methods):
            raise ConfigError(f"baselines.methods={_listed(methods)}; accepted: a non-empty list "
                              f"of {', '.join(METHODS)}")
        self.methods = tuple(methods)
        bounds = self.log_t_bounds
        if isinstance(bounds, str) or len(bounds) != 2:
            raise ConfigError(f"baselines.log_t_bounds={_listed(bounds)}; accepted: [low, high], "
                              "low < high")
        low, high = (values.number("baselines.log_t_bounds[]", b, lambda _: True, "a number")
                     for b in bounds)
        if not low < high:
            raise ConfigError(f"baselines.log_t_bounds={[low, high]}; accepted: [low, high], "
                              "low < high")
        self.log_t_bounds = (low, high)
        values.integer("baselines.ensemble_max_layers", self.ensemble_max_layers, 1)


def _listed(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(f"need logits [N, K] and labels [N] with N >= 1, got {logits.shape} "
                         f"and {labels.shape}")
    return logits, labels


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under ``softmax(logits / temperature)``."""
    logits, labels = _check(logits, labels)
    logp = option_log_softmax(logits / temperature)
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray,
                    log_bounds: tuple[float, float] = (-5.0, 5.0)) -> float:
    """The T in ``[exp(lo), exp(hi)]`` minimising the NLL (bounded search in log T)."""
    logits, labels = _check(logits, labels)
    found = minimize_scalar(lambda lt: nll(logits, labels, float(np.exp(lt))), bounds=log_bounds,
                            method="bounded", options={"xatol": 1e-6})
    return float(np.exp(found.x))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Option probabilities ``softmax(logits / T)``, float64 (0 where there is no option)."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def fit_histogram(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15,
                  binning: str = "guo") -> np.ndarray:
    """Per-bin accuracy of the top label on the calibration split [n_bins + slack]; NaN where
    a bin is empty (those keep their confidence when applied)."""
    probs = np.asarray(probs, dtype=np.float64)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    slot = bin_index(conf, n_bins, binning)
    size = n_bins + (binning == "torchmetrics")
    count = np.bincount(slot, minlength=size).astype(float)
    hits = np.bincount(slot, weights=(pred == np.asarray(labels)).astype(float), minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, hits / np.maximum(count, 1), np.nan)


def apply_histogram(probs: np.ndarray, accuracy: np.ndarray, n_bins: int = 15,
                    binning: str = "guo", valid: np.ndarray | None = None) -> np.ndarray:
    """Probabilities whose top label gets its bin's calibration accuracy; the other options
    keep their proportions of the remaining mass (shared evenly among the ``valid`` options
    when the top label held all of it)."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    new = accuracy[bin_index(conf, n_bins, binning)]
    return with_top(probs, np.where(np.isnan(new), conf, new), valid)


def with_top(probs: np.ndarray, new: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """``probs`` [N, K] whose top label gets probability ``new`` [N]; the other options keep
    their proportions of the remaining mass (shared evenly among the ``valid`` options when the
    top label held all of it)."""
    probs = np.asarray(probs, dtype=np.float64)
    rows = np.arange(len(probs))
    top = probs.argmax(axis=1)
    # the others' mass summed, not 1 - conf: near conf = 1 that difference cancels to a few ulp
    rest = np.where(np.arange(probs.shape[1]) == top[:, None], 0.0, probs).sum(axis=1)
    scale = np.where(rest > 0, (1.0 - new) / np.where(rest > 0, rest, 1.0), 0.0)
    out = probs * scale[:, None]
    out[rows, top] = new
    lone = rest <= 0  # every mass on one option: spread the rest evenly over the others
    if lone.any():
        ok = np.ones_like(probs, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        others = ok[lone] & (np.arange(probs.shape[1]) != top[lone, None])
        share = (1.0 - new[lone]) / np.maximum(others.sum(axis=1), 1)
        out[lone] = np.where(others, share[:, None], 0.0)
        out[rows[lone], top[lone]] = new[lone]
    return np.clip(out, 0.0, 1.0)  # rescaling may round a probability a few ulp past 1


def fit_bias(logits: np.ndarray) -> np.ndarray:
    """Per-option bias ``b_k = −log p̄_k``, p̄ the mean option distribution of ``logits`` [N, K]
    (0 for a slot no example has)."""
    mean = option_probabilities(np.asarray(logits, dtype=np.float64)).mean(axis=0)
    with np.errstate(divide="ignore"):
        return np.where(mean > 0, -np.log(np.where(mean > 0, mean, 1.0)), 0.0)


def apply_bias(logits: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Option probabilities ``softmax(z + b)``."""
    return option_probabilities(np.asarray(logits, dtype=np.float64) + bias)


def fit_vector(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vector scaling: per option slot (w, b) minimising the mean NLL of ``softmax(w ⊙ z + b)``
    (L-BFGS-B from w = 1, b = 0; slots at -inf stay there)."""
    logits, labels = _check(logits, labels)
    k = logits.shape[1]
    present = np.isfinite(logits)
    z = np.where(present, logits, 0.0)
    rows = np.arange(len(labels))

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:k], theta[k:]
        scores = np.where(present, w * z + b, -np.inf)
        logp = option_log_softmax(scores)
        p = np.exp(logp)
        grad_scores = np.where(present, p, 0.0)
        grad_scores[rows, labels] -= 1.0
        grad_scores /= len(labels)
        return (float(-logp[rows, labels].mean()),
                np.concatenate([(grad_scores * z).sum(axis=0), grad_scores.sum(axis=0)]))

    found = minimize(loss, np.concatenate([np.ones(k), np.zeros(k)]), jac=True,
                     method="L-BFGS-B")
    return found.x[:k], found.x[k:]


def apply_vector(logits: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Option probabilities ``softmax(w ⊙ z + b)`` (slots at -inf stay at 0)."""
    logits = np.asarray(logits, dtype=np.float64)
    present = np.isfinite(logits)
    return option_probabilities(np.where(present, w * np.where(present, logits, 0.0) + b,
                                         -np.inf))


def fit_isotonic(probs: np.ndarray, labels: np.ndarray):
    """A non-decreasing map of top-label confidence to correctness (scikit-learn)."""
    from sklearn.isotonic import IsotonicRegression

    probs = np.asarray(probs, dtype=np.float64)
    right = (probs.argmax(axis=1) == np.asarray(labels)).astype(float)
    return IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True,
                              out_of_bounds="clip").fit(probs.max(axis=1), right)


def apply_isotonic(probs: np.ndarray, model, valid: np.ndarray | None = None) -> np.ndarray:
    """Probabilities whose top label gets the fitted map of its confidence (:func:`with_top`)."""
    probs = np.asarray(probs, dtype=np.float64)
    return with_top(probs, model.predict(probs.max(axis=1)), valid)


def ensemble_probs(probs: np.ndarray, layer: int, m: int) -> np.ndarray:
    """The mean option probabilities of layers ``layer − m + 1 … layer`` of ``probs``
    [N, L, K]."""
    return probs[:, layer - m + 1:layer + 1].mean(axis=1)


def fit_ensemble(probs: np.ndarray, labels: np.ndarray, layer: int, max_layers: int) -> int:
    """The window m ≤ ``max_layers`` (and ≤ layer + 1) whose mean probabilities have the
    lowest NLL on ``probs`` [N, L, K] (the calibration split); ties: the smaller m."""
    rows = np.arange(len(labels))
    best, best_nll = 1, np.inf
    for m in range(1, min(max_layers, layer + 1) + 1):
        p = ensemble_probs(probs, layer, m)[rows, labels]
        value = float(-np.log(np.maximum(p, NLL_FLOOR)).mean())
        if value < best_nll - 1e-12:
            best, best_nll = m, value
    return best


COLUMNS = ("accuracy", "ece", "mce", "nll", "brier")  # the baselines table's metrics


def _method_probs(method: str, logits: np.ndarray, labels: np.ndarray, cal: np.ndarray,
                  evaluation: np.ndarray, layer: int, settings: BaselineSettings, n_bins: int,
                  binning: str, valid: np.ndarray, probs: np.ndarray | None
                  ) -> tuple[np.ndarray, float]:
    """One method fit on the calibration rows at ``layer``: evaluation probabilities [E, K] and
    its parameter."""
    fit_logits, ev_logits = logits[cal, layer], logits[evaluation, layer]
    if method == "temperature":
        t = fit_temperature(fit_logits, labels[cal], settings.log_t_bounds)
        return apply_temperature(ev_logits, t), t
    if method == "histogram":
        acc = fit_histogram(option_probabilities(fit_logits), labels[cal], n_bins, binning)
        return (apply_histogram(option_probabilities(ev_logits), acc, n_bins, binning, valid),
                float(np.nansum(~np.isnan(acc))))  # bins with a fitted accuracy
    if method == "bias":
        bias = fit_bias(fit_logits)
        return apply_bias(ev_logits, bias), float(np.abs(bias - bias.mean()).max())
    if method == "vector":
        w, b = fit_vector(fit_logits, labels[cal])
        return apply_vector(ev_logits, w, b), float(w.mean())
    if method == "isotonic":
        model = fit_isotonic(option_probabilities(fit_logits), labels[cal])
        return (apply_isotonic(option_probabilities(ev_logits), model, valid),
                float(len(model.X_thresholds_)))
    m = fit_ensemble(probs[cal], labels[cal], layer, settings.ensemble_max_layers)
    return ensemble_probs(probs[evaluation], layer, m), float(m)


def baseline_table(logits: np.ndarray, labels: np.ndarray, cal: np.ndarray, evaluation: np.ndarray,
                   settings: BaselineSettings, n_bins: int, binning: str, *,
                   paired: MetricSettings | None = None,
                   tested_layer: int | None = None) -> pd.DataFrame:
    """Per method and layer: the fitted parameter and the evaluation split's metrics before
    (``*_before``) and after, and ``delta_<metric>`` (after − before). ``logits`` [N, L+1, K]
    option scores, ``labels`` [N].

    With ``paired`` (the job's metric settings, bootstrap on) and ``tested_layer``: at that
    layer every method's paired interval against the raw model (``delta_<metric>_lo/hi``,
    ``metrics.paired_bootstrap`` replicates of the evaluation rows, the same for every method),
    its p-value, and its adjusted p-value over the methods (``metrics.correction``)."""
    before = layer_table(option_probabilities(logits[evaluation]), labels[evaluation],
                         n_bins=n_bins, binning=binning, extra_bins=(), extra_calibration=False)
    valid = np.isfinite(logits[evaluation, 0])
    probs = option_probabilities(logits) if "ensemble" in settings.methods else None
    rows, tested = [], []
    raw = option_probabilities(logits[evaluation])
    memo: dict = {}  # the raw model resampled once for every method
    before_values = {c: before[c].to_numpy(dtype=np.float64) for c in COLUMNS}
    for method in settings.methods:
        after = np.empty_like(logits[evaluation], dtype=np.float64)
        params = []
        for layer in range(logits.shape[1]):
            after[:, layer], param = _method_probs(method, logits, labels, cal, evaluation, layer,
                                                   settings, n_bins, binning, valid, probs)
            params.append(param)
        table = layer_table(after, labels[evaluation], n_bins=n_bins, binning=binning,
                            extra_bins=(), extra_calibration=False)
        ci = None
        if paired is not None and paired.bootstrap and tested_layer is not None:
            at = slice(tested_layer, tested_layer + 1)
            ci = paired_intervals(raw[:, at], after[:, at], labels[evaluation],
                                  paired.paired_bootstrap, paired.alpha, paired.seed, n_bins,
                                  binning, [True], reference_memo=memo).iloc[0]
        after_values = {c: table[c].to_numpy(dtype=np.float64) for c in COLUMNS}
        for layer, param in enumerate(params):
            row = {"layer": layer, "method": method, "parameter": param}
            row.update({f"{c}_before": float(before_values[c][layer]) for c in COLUMNS})
            row.update({c: float(after_values[c][layer]) for c in COLUMNS})
            row.update({f"delta_{c}": row[c] - row[f"{c}_before"] for c in COLUMNS})
            if ci is not None:
                hit = layer == tested_layer
                for metric in PAIRED:
                    for end in ("lo", "hi"):
                        row[f"delta_{metric}_{end}"] = \
                            float(ci[f"delta_{metric}_{end}"]) if hit else np.nan
                    row[f"significant_{metric}"] = bool(ci[f"significant_{metric}"]) and hit
                    row[f"p_{metric}"] = float(ci[f"p_{metric}"]) if hit else np.nan
                tested.append(hit)
            rows.append(row)
    out = pd.DataFrame(rows)
    if tested:
        out.insert(2, "tested", tested)
        out = adjust_table(out, paired.alpha, paired.correction)
    return out


def baselines_at(table: pd.DataFrame, layer: int) -> dict[str, dict[str, float]]:
    """Each method's parameter and metrics (before and after, the deltas, and where the layer
    was tested the paired interval, p-values and flags) at one layer."""
    rows = table[table["layer"] == layer]
    out = {}
    for row in rows.to_dict("records"):
        values = {}
        for key, value in row.items():
            if key in ("layer", "method", "tested"):
                continue
            if isinstance(value, (bool, np.bool_)):
                values[key] = bool(value)
            elif isinstance(value, (int, float, np.integer, np.floating)):
                values[key] = float(value)
        out[row["method"]] = values
    return out
