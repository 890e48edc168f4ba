"""Detect the paper's phases on a per-layer table: accuracy plateau, ECE peak, correction.

Definitions (layers are the table's ``layer`` values, rows sorted by layer; ``last`` is the
final row):

* plateau layer: the first layer P such that every layer from P through the last has accuracy
  within ``tolerance`` (inclusive, up to 1e-12 of float rounding) of the last layer's accuracy.
  It always exists.
* peak: the layer of highest ECE among layers >= P; on ties the *latest* such layer, so a flat
  top followed by a fall still counts as a peak and a flat ECE curve peaks at the last layer.
* correction layers: the contiguous run peak+1, peak+2, ... over which ECE strictly decreases
  (each layer's ECE below its predecessor's), ending before the first layer where ECE does not
  fall. Because the peak is the latest maximum, the run is non-empty whenever peak < last.
* emergence layer (:func:`emergence_layer`): the first layer from which the lower bound of
  the accuracy's bootstrap interval stays above chance through the last layer; None when the
  last layer's does not (accuracy never clearly above chance) or there are no intervals.
* A correction phase is reported only when all hold: P < last (accuracy has plateaued; else
  it still rises or falls at the output, see ``kind`` below), peak < last,
  ECE(peak) - ECE(last) > ``min_drop``, and, when a bootstrap ECE CI table is given, the peak's
  lower bound exceeds the last layer's upper bound. Otherwise the peak fields are None,
  ``correction_layers`` is [] and ``note`` says why.

``Phases.kind`` (``phase_kind`` in :func:`phases_to_dict`) is exactly one of :data:`KINDS`:

* ``"rising"``: P is the last layer and the layer before it is *below* the band, i.e. accuracy
  still rises by more than ``tolerance`` into the model's output (the paper's COPA case);
* ``"falling"``: P is the last layer and the layer before it is *above* the band, i.e. accuracy
  falls by more than ``tolerance`` in the last layer(s) (e.g. Gemma-3-270M on SST-2, 0.79 at
  layer 17 and 0.64 at layer 18);
* ``"correction"``: P < last and a correction phase is reported (``correction_layers`` non-empty);
* ``"plateau_no_correction"``: P < last and no correction phase (ECE highest at the last layer,
  a drop not above ``min_drop``, or a peak within the bootstrap noise); also a one-layer table.

Rise and fall are judged with ``tolerance`` only; the bootstrap intervals (``ci``) only decide
whether an ECE peak is a correction phase. A plateau entered from above (accuracy fell by more
than ``tolerance`` just before P) is still a plateau; its note says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from calibrate import values

KINDS: tuple[str, ...] = ("rising", "falling", "correction", "plateau_no_correction")
_EPS = 1e-12  # float slack so that a difference of exactly ``tolerance`` counts as within it


@dataclass
class PhaseSettings:
    """The ``phases`` group: what counts as a plateau and as a correction."""

    tolerance: float = 0.02  # accuracy within this of the last layer's is on the plateau
    min_drop: float = 0.0  # the ECE peak must exceed the last layer's ECE by more than this

    def __post_init__(self) -> None:
        values.number("phases.tolerance", self.tolerance, lambda t: t >= 0, "a number >= 0")
        values.number("phases.min_drop", self.min_drop, lambda d: d >= 0, "a number >= 0")


@dataclass(frozen=True)
class Phases:
    """Phases of one per-layer curve; see the module docstring for the definitions.

    ``kind`` (keyword-only, one of :data:`KINDS`) is the machine-readable class of the curve;
    ``note`` is its human-readable explanation.
    """

    plateau_layer: int | None
    peak_ece_layer: int | None
    peak_ece: float | None
    correction_layers: list[int] = field(default_factory=list)
    note: str = ""
    kind: str = field(kw_only=True)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown phase kind {self.kind!r}; accepted: {', '.join(KINDS)}")
        if (self.kind == "correction") != bool(self.correction_layers):
            raise ValueError("kind 'correction' goes with non-empty correction_layers, and only it")


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
    outside = np.nonzero(np.abs(accuracy - accuracy[-1]) > tolerance + _EPS)[0]
    return 0 if outside.size == 0 else int(outside[-1]) + 1


def _falling_run(ece: np.ndarray, peak: int) -> list[int]:
    run = []
    for i in range(peak + 1, len(ece)):
        if not ece[i] < ece[i - 1]:
            break
        run.append(i)
    return run


def _monotone_start(acc: np.ndarray, rising: bool) -> int:
    """Start of the monotone (non-decreasing when rising, else non-increasing) run ending at
    the last layer."""
    j = len(acc) - 2
    while j > 0 and (acc[j - 1] <= acc[j] if rising else acc[j - 1] >= acc[j]):
        j -= 1
    return j


def _trend_note(layers: np.ndarray, acc: np.ndarray, rising: bool, tolerance: float) -> str:
    j = _monotone_start(acc, rising)
    trend = "still rises into the last layer" if rising else "falls in the last layers"
    return (
        f"no correction phase: accuracy {trend} ({acc[j]:.4f} at layer {layers[j]} to "
        f"{acc[-1]:.4f} at layer {layers[-1]}; the layer before the last differs from it by "
        f"{abs(acc[-2] - acc[-1]):.4f} > tolerance {tolerance})"
    )


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
        tolerance: accuracy band (absolute) around the last layer's accuracy for the plateau;
            a change by more than this into the last layer is a rise or a fall.
        min_drop: the peak ECE minus the last layer's ECE must exceed this.
        ci: optional ``bootstrap_layer_ci(..., metric="ece")`` table; then the peak's lower
            bound must exceed the last layer's upper bound.

    Returns:
        Phases (with ``kind`` one of :data:`KINDS`); see the module docstring for the rules.
    """
    layers, acc, ece = _curves(table)
    plateau = plateau_index(acc, tolerance)
    p_layer = int(layers[plateau])
    last = len(layers) - 1
    if last == 0:
        note = "no correction phase: a single layer shows no trend"
        return Phases(p_layer, None, None, [], note, kind="plateau_no_correction")
    if plateau == last:
        rising = bool(acc[-2] < acc[-1])
        note = _trend_note(layers, acc, rising, tolerance)
        return Phases(p_layer, None, None, [], note, kind="rising" if rising else "falling")
    entered = ""
    if plateau > 0 and acc[plateau - 1] > acc[-1]:
        entered = (f" (entered from above: accuracy {acc[plateau - 1]:.4f} at layer "
                   f"{layers[plateau - 1]})")
    tail = ece[plateau:]
    peak = plateau + len(tail) - 1 - int(np.argmax(tail[::-1]))  # latest maximum
    reason = _rejection(layers, ece, peak, min_drop, ci)
    if reason is not None:
        note = f"{reason}; accuracy plateaus from layer {p_layer}{entered}"
        return Phases(p_layer, None, None, [], note, kind="plateau_no_correction")
    run_idx = _falling_run(ece, peak)
    run = [int(layers[i]) for i in run_idx]
    note = (
        f"accuracy plateaus from layer {p_layer}{entered}; ECE peaks at layer "
        f"{int(layers[peak])} ({ece[peak]:.4f}) and falls over layers {run[0]}-{run[-1]} to "
        f"{ece[run_idx[-1]]:.4f}"
    )
    return Phases(p_layer, int(layers[peak]), float(ece[peak]), run, note, kind="correction")


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
    """JSON-ready dict: plateau_layer, peak_ece_layer, peak_ece, correction_layers, phase_note,
    phase_kind (one of :data:`KINDS`)."""
    return {
        "plateau_layer": p.plateau_layer,
        "peak_ece_layer": p.peak_ece_layer,
        "peak_ece": p.peak_ece,
        "correction_layers": list(p.correction_layers),
        "phase_note": p.note,
        "phase_kind": p.kind,
    }


def find_phases(table: pd.DataFrame, settings: PhaseSettings) -> Phases:
    """:func:`detect_phases` with the ``phases`` config; when the table carries bootstrap
    intervals (``ece_lo``/``ece_hi``), a peak inside the noise is not called a peak."""
    ci = None
    if "ece_lo" in table.columns:
        ci = pd.DataFrame({"layer": table["layer"], "ece": table["ece"], "lo": table["ece_lo"],
                           "hi": table["ece_hi"]})
    return detect_phases(table, tolerance=settings.tolerance, min_drop=settings.min_drop, ci=ci)
