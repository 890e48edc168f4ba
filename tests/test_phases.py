"""Tests of calibrate.phases on synthetic per-layer curves."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from calibrate.metrics import bootstrap_layer_ci, layer_table
from calibrate.phases import Phases, detect_phases, emergence_layer, phases_to_dict

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
    assert p.note == "no correction phase: accuracy still rises into the last layer"


def test_flat_ece_has_no_peak() -> None:
    p = detect_phases(_table(CLEAN_ACC, [0.1] * 12))
    assert p.plateau_layer == 6
    assert p.peak_ece_layer is None and p.correction_layers == []
    assert p.note.startswith("no correction phase")


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
    keys = {"plateau_layer", "peak_ece_layer", "peak_ece", "correction_layers", "phase_note"}
    assert set(d) == keys
    assert json.loads(json.dumps(d)) == d
    empty = phases_to_dict(Phases(11, None, None, [], "no correction phase: x"))
    assert empty["correction_layers"] == [] and empty["peak_ece"] is None


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


# ---------------------------------------------------------------- emergence

def test_emergence_is_where_the_lower_bound_stays_above_chance():
    lo = [0.20, 0.30, 0.24, 0.27, 0.31, 0.40]  # above 0.25 at 1, dips at 2, stays from 3
    table = pd.DataFrame({"layer": range(6), "accuracy_lo": lo})
    assert emergence_layer(table, 0.25) == 3
    assert emergence_layer(table.iloc[::-1], 0.25) == 3  # rows in any order
    assert emergence_layer(table, 0.19) == 0
    assert emergence_layer(table, 0.40) is None  # the last layer's bound is not above chance
    assert emergence_layer(table.drop(columns="accuracy_lo"), 0.25) is None  # no bootstrap
