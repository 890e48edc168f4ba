"""Tests of calibrate.core.phases on synthetic per-layer curves."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from calibrate.core.bootstrap import bootstrap_layer_ci
from calibrate.core.metrics import layer_table
from calibrate.core.phases import (
    KINDS,
    Phases,
    PhaseSettings,
    detect_phases,
    emergence_layer,
    find_phases,
    phases_to_dict,
)

# plateau from layer 6 (|acc - 0.6| <= 0.02), ECE peak at 9, falls over 10 and 11
CLEAN_ACC = [0.25, 0.25, 0.26, 0.30, 0.40, 0.50, 0.60, 0.60, 0.61, 0.60, 0.60, 0.60]
CLEAN_ECE = [0.05, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20, 0.25, 0.30, 0.20, 0.10]


def _table(acc: list[float], ece: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"layer": range(len(acc)), "accuracy": acc, "ece": ece})


def test_clean_plateau_peak_correction() -> None:
    p = detect_phases(_table(CLEAN_ACC, CLEAN_ECE))
    assert p.plateau_layer == 6
    assert p.peak_ece_layer == 9
    assert p.peak_ece == pytest.approx(0.30)
    assert p.correction_layers == [10, 11]
    assert "peaks at layer 9" in p.note
    assert p.kind == "correction"


def test_correction_run_stops_where_ece_stops_falling() -> None:
    ece = CLEAN_ECE[:10] + [0.20, 0.22]
    p = detect_phases(_table(CLEAN_ACC, ece))
    assert (p.peak_ece_layer, p.correction_layers) == (9, [10])


def test_rows_out_of_order_and_offset_layers() -> None:
    table = _table(CLEAN_ACC, CLEAN_ECE).assign(layer=lambda t: t["layer"] + 1)
    p = detect_phases(table.sample(frac=1.0, random_state=0))
    assert (p.plateau_layer, p.peak_ece_layer, p.correction_layers) == (7, 10, [11, 12])


def test_accuracy_still_rising_into_last_layer() -> None:
    acc = [0.25 + 0.05 * i for i in range(12)]
    p = detect_phases(_table(acc, CLEAN_ECE))
    assert p.plateau_layer == 11
    assert p.peak_ece_layer is None and p.peak_ece is None and p.correction_layers == []
    assert p.kind == "rising"
    assert p.note.startswith("no correction phase: accuracy still rises into the last layer")
    assert "0.2500 at layer 0 to 0.8000 at layer 11" in p.note  # monotone since layer 0


def test_flat_ece_has_no_peak() -> None:
    p = detect_phases(_table(CLEAN_ACC, [0.1] * 12))
    assert p.plateau_layer == 6
    assert p.peak_ece_layer is None and p.correction_layers == []
    assert p.note.startswith("no correction phase")
    assert p.kind == "plateau_no_correction"


def test_min_drop() -> None:
    # peak 0.30, final 0.10: a drop of 0.20
    assert detect_phases(_table(CLEAN_ACC, CLEAN_ECE), min_drop=0.19).correction_layers == [10, 11]
    p = detect_phases(_table(CLEAN_ACC, CLEAN_ECE), min_drop=0.25)
    assert p.correction_layers == [] and "min_drop" in p.note


def test_ci_rule_on_hand_made_intervals() -> None:
    table = _table(CLEAN_ACC, CLEAN_ECE)
    ece = np.array(CLEAN_ECE)
    narrow = pd.DataFrame({"layer": range(12), "ece": ece, "lo": ece - 0.01, "hi": ece + 0.01})
    assert detect_phases(table, ci=narrow).correction_layers == [10, 11]
    wide = narrow.assign(lo=ece - 0.15, hi=ece + 0.15)
    p = detect_phases(table, ci=wide)
    assert p.correction_layers == [] and p.peak_ece_layer is None
    assert "within the bootstrap noise" in p.note
    assert p.kind == "plateau_no_correction"


def _bumped_probs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy 0.7 at every layer; every example has the same confidence c_l at layer l,
    so ECE_l = |0.7 - c_l| = 0, .02, .04, .06, .04, .02 (peak at layer 3)."""
    conf = np.array([0.70, 0.72, 0.74, 0.76, 0.74, 0.72])
    probs = np.stack([conf, 1 - conf], axis=-1)[None].repeat(n, axis=0)
    labels = (np.arange(n) >= round(0.7 * n)).astype(int)
    return probs, labels


@pytest.mark.parametrize(("n", "found"), [(60, False), (5000, True)])
def test_ci_rule_with_bootstrap(n: int, found: bool) -> None:
    probs, labels = _bumped_probs(n)
    table = layer_table(probs, labels, n_bins=15)
    np.testing.assert_allclose(table["ece"], [0, 0.02, 0.04, 0.06, 0.04, 0.02], atol=1e-12)
    assert detect_phases(table).correction_layers == [4, 5]  # without the CI rule
    ci = bootstrap_layer_ci(probs, labels, "ece", n_boot=300, seed=0)
    p = detect_phases(table, ci=ci)
    assert (p.correction_layers == [4, 5]) is found
    assert ("within the bootstrap noise" in p.note) is not found


def test_phases_to_dict_is_json_ready() -> None:
    d = phases_to_dict(detect_phases(_table(CLEAN_ACC, CLEAN_ECE)))
    keys = {"plateau_layer", "peak_ece_layer", "peak_ece", "correction_layers", "phase_note",
            "phase_kind"}
    assert set(d) == keys
    assert d["phase_kind"] == "correction"
    assert json.loads(json.dumps(d)) == d
    empty = phases_to_dict(Phases(11, None, None, [], "no correction phase: x", kind="falling"))
    assert empty["correction_layers"] == [] and empty["peak_ece"] is None
    assert empty["phase_kind"] == "falling"


def test_phases_kind_is_validated() -> None:
    with pytest.raises(ValueError, match="unknown phase kind 'flat'"):
        Phases(3, None, None, [], "x", kind="flat")
    with pytest.raises(ValueError, match="correction"):
        Phases(3, None, None, [], "x", kind="correction")  # a correction needs its layers
    with pytest.raises(ValueError, match="correction"):
        Phases(3, 4, 0.3, [5], "x", kind="plateau_no_correction")
    with pytest.raises(TypeError):
        Phases(3, None, None, [], "x")  # kind is required


def test_validation() -> None:
    with pytest.raises(ValueError, match="ece"):
        detect_phases(pd.DataFrame({"layer": [0], "accuracy": [0.5]}))
    with pytest.raises(ValueError, match="empty"):
        detect_phases(_table([], []))
    with pytest.raises(ValueError, match="finite"):
        detect_phases(_table([0.5, np.nan], [0.1, 0.2]))
    bad_ci = pd.DataFrame({"layer": range(12), "lo": 0.0, "hi": 1.0})
    with pytest.raises(ValueError, match="bootstrap ECE table"):
        detect_phases(_table(CLEAN_ACC, CLEAN_ECE), ci=bad_ci)


# ---------------------------------------------------------------- kind: the four cases

# Gemma-3-270M on SST-2 (offline study): accuracy 0.79 at layer 17, 0.64 at layer 18 (the output)
GEMMA_ACC = [0.50, 0.50, 0.51, 0.52, 0.55, 0.58, 0.60, 0.62, 0.65, 0.66, 0.68, 0.70, 0.71, 0.72,
             0.73, 0.78, 0.65, 0.79, 0.64]
GEMMA_ECE = [0.02, 0.02, 0.03, 0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.18, 0.20, 0.22,
             0.25, 0.28, 0.20, 0.30, 0.10]  # a high-then-low ECE that must not read as correction


def test_kind_falling_gemma_like() -> None:
    p = detect_phases(_table(GEMMA_ACC, GEMMA_ECE), tolerance=0.02)
    assert p.kind == "falling"
    assert p.plateau_layer == 18  # |0.79 - 0.64| = 0.15 > 0.02: only the last layer is in band
    assert (p.peak_ece_layer, p.peak_ece, p.correction_layers) == (None, None, [])
    assert "rises" not in p.note
    assert p.note.startswith("no correction phase: accuracy falls in the last layers")
    assert "0.7900 at layer 17 to 0.6400 at layer 18" in p.note


def test_kind_falling_over_several_layers() -> None:
    acc = CLEAN_ACC[:9] + [0.66, 0.62, 0.57]  # 0.61 at 8, then 0.66, 0.62, 0.57
    p = detect_phases(_table(acc, CLEAN_ECE))
    assert p.kind == "falling" and p.plateau_layer == 11
    assert "0.6600 at layer 9 to 0.5700 at layer 11" in p.note  # the fall starts at the top


def test_kind_rising_at_the_output() -> None:
    acc = CLEAN_ACC[:10] + [0.60, 0.70]  # a jump of 0.10 into the last layer after a flat stretch
    p = detect_phases(_table(acc, CLEAN_ECE))
    assert p.kind == "rising" and p.plateau_layer == 11
    assert "0.6000 at layer 9 to 0.7000 at layer 11" in p.note


def test_kind_plateau_with_and_without_correction() -> None:
    with_corr = detect_phases(_table(CLEAN_ACC, CLEAN_ECE))
    assert (with_corr.kind, with_corr.correction_layers) == ("correction", [10, 11])
    ece_up = CLEAN_ECE[:10] + [0.35, 0.40]  # ECE highest at the last layer
    without = detect_phases(_table(CLEAN_ACC, ece_up))
    assert without.kind == "plateau_no_correction" and without.plateau_layer == 6
    assert "ECE is highest at the last layer (11)" in without.note
    assert "accuracy plateaus from layer 6" in without.note


def test_kind_plateau_entered_from_above() -> None:
    # accuracy peaks at 0.80 (layer 7) and settles at 0.60 from layer 8: a plateau, said so
    acc = [0.25, 0.30, 0.40, 0.50, 0.60, 0.70, 0.75, 0.80, 0.60, 0.61, 0.60, 0.60]
    p = detect_phases(_table(acc, CLEAN_ECE))
    assert p.kind == "correction" and p.plateau_layer == 8
    assert "entered from above: accuracy 0.8000 at layer 7" in p.note


@pytest.mark.parametrize(
    ("last_two", "tolerance", "kind"),
    [
        ((0.60, 0.62), 0.02, "correction"),  # a change of exactly the tolerance is within it
        ((0.60, 0.585), 0.02, "correction"),  # a fall of 0.015 < 0.02 is no fall
        ((0.60, 0.585), 0.01, "falling"),  # but it is one with tolerance 0.01
        ((0.60, 0.615), 0.01, "rising"),
    ],
)
def test_kind_uses_the_tolerance(last_two: tuple[float, float], tolerance: float,
                                 kind: str) -> None:
    acc = [0.25, 0.30, 0.40, 0.50, 0.60, 0.60, 0.60, 0.60, 0.60, 0.60, *last_two]
    p = detect_phases(_table(acc, CLEAN_ECE), tolerance=tolerance)
    assert p.kind == kind
    assert p.kind in KINDS


def test_find_phases_reads_tolerance_and_intervals() -> None:
    table = _table(GEMMA_ACC, GEMMA_ECE)
    assert find_phases(table, PhaseSettings(tolerance=0.02, min_drop=0.0)).kind == "falling"
    # a tolerance wider than the fall: every layer (0.50 ... 0.79) lies within 0.2 of 0.64, so
    # the plateau starts at 0, ECE peaks at 17 (0.30) and falls at 18
    wide = find_phases(table, PhaseSettings(tolerance=0.2, min_drop=0.0))
    assert (wide.kind, wide.plateau_layer, wide.correction_layers) == ("correction", 0, [18])
    # with bootstrap columns the peak must clear the noise, as before
    ece = np.array(GEMMA_ECE)
    noisy = table.assign(ece_lo=ece - 0.15, ece_hi=ece + 0.15)
    p = find_phases(noisy, PhaseSettings(tolerance=0.2, min_drop=0.0))
    assert p.kind == "plateau_no_correction" and "within the bootstrap noise" in p.note


@pytest.mark.parametrize("key, value, message", [
    ("tolerance", -0.01, "phases.tolerance=-0.01; accepted: a number >= 0"),
    ("tolerance", "0.02", "phases.tolerance='0.02'; accepted: a number >= 0"),
    ("min_drop", -1, "phases.min_drop=-1; accepted: a number >= 0"),
    ("min_drop", float("nan"), "phases.min_drop=nan; accepted: a number >= 0"),
])
def test_phase_settings_are_checked(key, value, message) -> None:
    from calibrate.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        PhaseSettings(**{key: value})
    assert str(err.value) == message
    assert PhaseSettings() == PhaseSettings(0.02, 0.0)


def test_the_composed_phases_group_is_typed() -> None:
    from conftest import typed

    assert typed().phases == PhaseSettings()
    assert typed("phases.tolerance=0.05").phases == PhaseSettings(tolerance=0.05)


def test_single_layer_table() -> None:
    p = detect_phases(_table([0.5], [0.1]))
    assert p.kind == "plateau_no_correction" and p.plateau_layer == 0
    assert "single layer" in p.note


# ---------------------------------------------------------------- emergence

def test_emergence_is_where_the_lower_bound_stays_above_chance():
    lo = [0.20, 0.30, 0.24, 0.27, 0.31, 0.40]  # above 0.25 at 1, dips at 2, stays from 3
    table = pd.DataFrame({"layer": range(6), "accuracy_lo": lo})
    assert emergence_layer(table, 0.25) == 3
    assert emergence_layer(table.iloc[::-1], 0.25) == 3  # rows in any order
    assert emergence_layer(table, 0.19) == 0
    assert emergence_layer(table, 0.40) is None  # the last layer's bound is not above chance
    assert emergence_layer(table.drop(columns="accuracy_lo"), 0.25) is None  # no bootstrap
