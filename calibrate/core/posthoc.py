"""Post-hoc recalibration of option scores: the baselines a calibration direction must beat.

Pure functions on option logits ``[N, K]`` (``-inf`` where an example has fewer options) and
labels ``[N]``; fit on one split, apply to another.

* Temperature scaling (Guo et al. 2017): one T > 0 minimising the NLL of ``softmax(logits / T)``,
  a bounded scalar search in log T.
* Histogram binning (Zadrozny & Elkan 2001), top-label: the top-label confidence is replaced by
  the calibration split's accuracy in its equal-width bin (bins the split leaves empty keep the
  confidence); the other options share the rest of the mass in their original proportions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from calibrate import values
from calibrate.core.metrics import bin_index, layer_table
from calibrate.core.option_scores import option_probabilities
from calibrate.errors import ConfigError

METHODS = ("temperature", "histogram")


@dataclass
class BaselineSettings:
    """The ``baselines`` group: which post-hoc methods, and the temperature search interval."""

    methods: tuple[str, ...] = METHODS
    log_t_bounds: tuple[float, float] = (-5.0, 5.0)

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
    logp = log_softmax(logits / temperature, axis=1)
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
    rows = np.arange(len(probs))
    top = probs.argmax(axis=1)
    conf = probs[rows, top]
    new = accuracy[bin_index(conf, n_bins, binning)]
    new = np.where(np.isnan(new), conf, new)
    # the others' mass summed, not 1 - conf: near conf = 1 that difference cancels to a few ulp
    # and would rescale the others by the wrong factor (rows then miss summing to 1)
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


COLUMNS = ("accuracy", "ece", "mce", "nll", "brier")  # the baselines table's metrics


def baseline_table(logits: np.ndarray, labels: np.ndarray, cal: np.ndarray, evaluation: np.ndarray,
                   settings: BaselineSettings, n_bins: int, binning: str) -> pd.DataFrame:
    """Per method and layer: the fitted parameter and the evaluation split's metrics before
    (``*_before``) and after. ``logits`` [N, L+1, K] option scores, ``labels`` [N]."""
    before = layer_table(option_probabilities(logits[evaluation]), labels[evaluation],
                         n_bins=n_bins, binning=binning, extra_bins=(), extra_calibration=False)
    valid = np.isfinite(logits[evaluation, 0])
    rows = []
    for method in settings.methods:
        after = np.empty_like(logits[evaluation], dtype=np.float64)
        params = []
        for layer in range(logits.shape[1]):
            fit_logits, ev_logits = logits[cal, layer], logits[evaluation, layer]
            if method == "temperature":
                t = fit_temperature(fit_logits, labels[cal], settings.log_t_bounds)
                after[:, layer], param = apply_temperature(ev_logits, t), t
            else:
                acc = fit_histogram(option_probabilities(fit_logits), labels[cal], n_bins, binning)
                after[:, layer] = apply_histogram(option_probabilities(ev_logits), acc, n_bins,
                                                  binning, valid)
                param = float(np.nansum(~np.isnan(acc)))  # bins with a fitted accuracy
            params.append(param)
        table = layer_table(after, labels[evaluation], n_bins=n_bins, binning=binning,
                            extra_bins=(), extra_calibration=False)
        for layer, param in enumerate(params):
            row = {"layer": layer, "method": method, "parameter": param}
            row.update({f"{c}_before": float(before[c].iloc[layer]) for c in COLUMNS})
            row.update({c: float(table[c].iloc[layer]) for c in COLUMNS})
            rows.append(row)
    return pd.DataFrame(rows)


def baselines_at(table: pd.DataFrame, layer: int) -> dict[str, dict[str, float]]:
    """Each method's parameter and metrics (before and after) at one layer."""
    rows = table[table["layer"] == layer]
    keep = ("parameter", *COLUMNS, *(f"{c}_before" for c in COLUMNS))
    return {row["method"]: {k: float(row[k]) for k in keep} for row in rows.to_dict("records")}
