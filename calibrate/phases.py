"""Detect the paper's phases on a per-layer table: accuracy plateau, ECE peak, correction.

Definitions (layers are the table's ``layer`` values, rows sorted by layer; ``last`` is the
final row):

* plateau layer: the first layer P such that every layer from P through the last has accuracy
  within ``tolerance`` (inclusive) of the last layer's accuracy. It always exists.
* peak: the layer of highest ECE among layers >= P; on ties the *latest* such layer, so a flat
  top followed by a fall still counts as a peak and a flat ECE curve peaks at the last layer.
* correction layers: the contiguous run peak+1, peak+2, ... over which ECE strictly decreases
  (each layer's ECE below its predecessor's), ending before the first layer where ECE does not
  fall. Because the peak is the latest maximum, the run is non-empty whenever peak < last.
* emergence layer (:func:`emergence_layer`): the first layer from which the lower bound of
  the accuracy's bootstrap interval stays above chance through the last layer; None when the
  last layer's does not (accuracy never clearly above chance) or there are no intervals.
* A correction phase is reported only when all hold: P < last (accuracy has plateaued; else the
  paper's COPA case), peak < last, ECE(peak) - ECE(last) > ``min_drop``, and, when a bootstrap
  ECE CI table is given, the peak's lower bound exceeds the last layer's upper bound. Otherwise
  the peak fields are None, ``correction_layers`` is [] and ``note`` says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Phases:
    """Phases of one per-layer curve; see the module docstring for the definitions."""

    plateau_layer: int | None
    peak_ece_layer: int | None
    peak_ece: float | None
    correction_layers: list[int] = field(default_factory=list)
    note: str = ""


def _curves(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    missing = {"layer", "accuracy", "ece"} - set(table.columns)
    if missing:
        raise ValueError(f"table lacks column(s) {sorted(missing)}")
    if len(table) == 0:
        raise ValueError("table is empty")
    t = table.sort_values("layer")
    acc, ece = t["accuracy"].to_numpy(float), t["ece"].to_numpy(float)
    if not (np.all(np.isfinite(acc)) and np.all(np.isfinite(ece))):
        raise ValueError("accuracy and ece must be finite at every layer")
    return t["layer"].to_numpy(int), acc, ece


def plateau_index(accuracy: np.ndarray, tolerance: float) -> int:
    """Position of the first layer from which accuracy stays within tolerance of the last."""
    outside = np.nonzero(np.abs(accuracy - accuracy[-1]) > tolerance)[0]
    return 0 if outside.size == 0 else int(outside[-1]) + 1


def _falling_run(ece: np.ndarray, peak: int) -> list[int]:
    run = []
    for i in range(peak + 1, len(ece)):
        if not ece[i] < ece[i - 1]:
            break
        run.append(i)
    return run


def _ci_bounds(ci: pd.DataFrame, layer: int) -> tuple[float, float]:
    if not {"layer", "ece", "lo", "hi"} <= set(ci.columns):
        raise ValueError("ci must be a bootstrap ECE table with columns layer, ece, lo, hi")
    row = ci[ci["layer"] == layer]
    if len(row) != 1:
        raise ValueError(f"ci has no single row for layer {layer}")
    return float(row["lo"].iloc[0]), float(row["hi"].iloc[0])


def _rejection(
    layers: np.ndarray, ece: np.ndarray, peak: int, min_drop: float, ci: pd.DataFrame | None
) -> str | None:
    """Why the peak is not a correction phase, or None when it is one."""
    if peak == len(ece) - 1:
        return f"no correction phase: ECE is highest at the last layer ({layers[-1]})"
    drop = ece[peak] - ece[-1]
    if not drop > min_drop:
        return (
            f"no correction phase: ECE falls by {drop:.4f} after its peak, "
            f"not above min_drop={min_drop}"
        )
    if ci is not None:
        peak_lo, _ = _ci_bounds(ci, int(layers[peak]))
        _, last_hi = _ci_bounds(ci, int(layers[-1]))
        if not peak_lo > last_hi:
            return (
                f"no correction phase: the ECE peak is within the bootstrap noise "
                f"(peak lower bound {peak_lo:.4f} <= last-layer upper bound {last_hi:.4f})"
            )
    return None


def detect_phases(
    table: pd.DataFrame,
    tolerance: float = 0.02,
    min_drop: float = 0.0,
    ci: pd.DataFrame | None = None,
) -> Phases:
    """Find the accuracy plateau, the ECE peak after it and the correction layers.

    Args:
        table: per-layer table with columns layer, accuracy, ece (e.g. from ``layer_table``).
        tolerance: accuracy band (absolute) around the last layer's accuracy for the plateau.
        min_drop: the peak ECE minus the last layer's ECE must exceed this.
        ci: optional ``bootstrap_layer_ci(..., metric="ece")`` table; then the peak's lower
            bound must exceed the last layer's upper bound.

    Returns:
        Phases; see the module docstring for the exact rules.
    """
    layers, acc, ece = _curves(table)
    plateau = plateau_index(acc, tolerance)
    p_layer = int(layers[plateau])
    if plateau == len(layers) - 1:
        note = "no correction phase: accuracy still rises into the last layer"
        return Phases(p_layer, None, None, [], note)
    tail = ece[plateau:]
    peak = plateau + len(tail) - 1 - int(np.argmax(tail[::-1]))  # latest maximum
    reason = _rejection(layers, ece, peak, min_drop, ci)
    if reason is not None:
        return Phases(p_layer, None, None, [], reason)
    run_idx = _falling_run(ece, peak)
    run = [int(layers[i]) for i in run_idx]
    note = (
        f"accuracy plateaus from layer {p_layer}; ECE peaks at layer {int(layers[peak])} "
        f"({ece[peak]:.4f}) and falls over layers {run[0]}-{run[-1]} to {ece[run_idx[-1]]:.4f}"
    )
    return Phases(p_layer, int(layers[peak]), float(ece[peak]), run, note)


def emergence_layer(table: pd.DataFrame, chance: float) -> int | None:
    """First layer from which ``accuracy_lo`` stays above ``chance`` to the last layer (None when
    the last layer's bound is not above chance, or the table has no ``accuracy_lo``)."""
    if "accuracy_lo" not in table.columns or len(table) == 0:
        return None
    t = table.sort_values("layer")
    above = t["accuracy_lo"].to_numpy(float) > chance
    if not above[-1]:
        return None
    below = np.nonzero(~above)[0]
    return int(t["layer"].iloc[0 if below.size == 0 else int(below[-1]) + 1])


def phases_to_dict(p: Phases) -> dict:
    """JSON-ready dict: plateau_layer, peak_ece_layer, peak_ece, correction_layers, phase_note."""
    return {
        "plateau_layer": p.plateau_layer,
        "peak_ece_layer": p.peak_ece_layer,
        "peak_ece": p.peak_ece,
        "correction_layers": list(p.correction_layers),
        "phase_note": p.note,
    }


def find_phases(table: pd.DataFrame, phases_cfg: Mapping[str, Any]) -> Phases:
    """:func:`detect_phases` with the ``phases`` config; when the table carries bootstrap
    intervals (``ece_lo``/``ece_hi``), a peak inside the noise is not called a peak."""
    ci = None
    if "ece_lo" in table.columns:
        ci = pd.DataFrame({"layer": table["layer"], "ece": table["ece"], "lo": table["ece_lo"],
                           "hi": table["ece_hi"]})
    return detect_phases(table, tolerance=float(phases_cfg["tolerance"]),
                         min_drop=float(phases_cfg["min_drop"]), ci=ci)
