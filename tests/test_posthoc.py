"""Post-hoc recalibration maths against hand-made references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from calibrate.core.posthoc import (
    apply_histogram,
    apply_temperature,
    fit_histogram,
    fit_temperature,
    nll,
)


def synthetic(n: int = 400, scale: float = 3.0, seed: int = 0):
    """Logits whose true temperature is ``scale``: labels drawn from softmax(logits / scale)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 4)) * 4.0
    labels = np.array([rng.choice(4, p=p) for p in softmax(logits / scale, axis=1)])
    return logits, labels


def test_temperature_is_the_nll_minimum_on_a_grid():
    logits, labels = synthetic()
    t = fit_temperature(logits, labels)
    grid = np.exp(np.linspace(-3, 3, 6001))
    best = grid[np.argmin([nll(logits, labels, g) for g in grid])]
    assert t == pytest.approx(best, rel=2e-3)
    assert 2.0 < t < 4.5  # near the temperature the labels were drawn with (3)
    assert nll(logits, labels, t) <= nll(logits, labels, 1.0)


def test_temperature_leaves_predictions_and_handles_missing_options():
    logits, labels = synthetic(n=50)
    logits[:10, 3] = -np.inf  # three options for the first ten examples
    t = fit_temperature(logits, labels % 3)
    probs = apply_temperature(logits, t)
    assert np.allclose(probs.sum(axis=1), 1.0) and np.all(probs[:10, 3] == 0.0)
    assert np.array_equal(probs.argmax(axis=1), logits.argmax(axis=1))


def test_temperature_stays_inside_its_bounds():
    logits = np.array([[5.0, 0.0], [5.0, 0.0]])
    labels = np.array([0, 0])  # always right: NLL keeps falling as T -> 0
    t = fit_temperature(logits, labels, (-2.0, 2.0))
    assert np.exp(-2.0) <= t < 0.2  # pushed to the sharp end, never past the bound


def test_histogram_binning_by_hand():
    # 4 bins. Calibration: top confidences 0.9 (right), 0.9 (wrong), 0.6 (right).
    cal = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    acc = fit_histogram(cal, np.array([0, 1, 1]), n_bins=4)
    assert np.isnan(acc[0]) and np.isnan(acc[1]) and acc[2] == 1.0 and acc[3] == 0.5
    # 0.8 -> bin 3 (accuracy 0.5); 0.7 and 0.55 -> bin 2 (1.0); 0.5 -> bin 1, empty: kept
    out = apply_histogram(np.array([[0.8, 0.2], [0.3, 0.7], [0.55, 0.45], [0.5, 0.5]]), acc,
                          n_bins=4)
    np.testing.assert_allclose(out, [[0.5, 0.5], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])


def test_histogram_keeps_proportions_of_the_rest_and_sums_to_one():
    probs = np.array([[0.7, 0.2, 0.1, 0.0]])
    acc = np.array([np.nan, np.nan, 0.4, np.nan])
    out = apply_histogram(probs, acc, n_bins=4, valid=np.array([[True, True, True, False]]))
    np.testing.assert_allclose(out, [[0.4, 0.4, 0.2, 0.0]])
    lone = apply_histogram(np.array([[1.0, 0.0, 0.0]]), np.array([np.nan, 0.5, np.nan, 0.7]),
                           n_bins=4, valid=np.array([[True, True, False]]))
    np.testing.assert_allclose(lone, [[0.7, 0.3, 0.0]])


def test_histogram_near_certain_top_label_still_sums_to_one():
    """A real cloze row (ARC-Easy, SmolLM2's embeddings layer): the top label holds all but
    2.5e-14 of the mass, where 1 - conf loses its digits to cancellation; the others keep their
    proportions of 1 - new, computed from their own sum."""
    probs = np.array([[2.469762648185335e-14, 1.852324767270281e-18, 9.999999999999754e-01,
                       1.109722826582377e-16, 0.0]])
    acc = np.full(15, np.nan)
    acc[-1] = 0.3225806451612903
    out = apply_histogram(probs, acc, n_bins=15, valid=np.array([[True] * 4 + [False]]))
    assert out.sum() == pytest.approx(1.0, abs=1e-12)
    others = probs[0, [0, 1, 3]]
    np.testing.assert_allclose(out[0, [0, 1, 3]], (1 - acc[-1]) * others / others.sum(), rtol=1e-12)
    assert out[0, 2] == acc[-1] and out[0, 4] == 0.0


# ---------------------------------------------------------------- the baselines group and table

@pytest.mark.parametrize("key, value, message", [
    ("methods", [], "baselines.methods=[]; accepted: a non-empty list of temperature, histogram"),
    ("methods", "temperature",
     "baselines.methods=temperature; accepted: a non-empty list of temperature, histogram"),
    ("methods", ["platt"], ("baselines.methods=['platt']; accepted: a non-empty list of "
                            "temperature, histogram")),
    ("log_t_bounds", [1.0], "baselines.log_t_bounds=[1.0]; accepted: [low, high], low < high"),
    ("log_t_bounds", [2, 1], "baselines.log_t_bounds=[2.0, 1.0]; accepted: [low, high], low < high"),
    ("log_t_bounds", [0, "x"], "baselines.log_t_bounds[]='x'; accepted: a number"),
])
def test_baseline_settings_are_checked(key, value, message):
    from calibrate.core.posthoc import BaselineSettings
    from calibrate.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        BaselineSettings(**{key: value})
    assert str(err.value) == message


def test_baseline_settings_defaults_and_the_composed_group():
    from conftest import typed

    from calibrate.core.posthoc import BaselineSettings

    settings = BaselineSettings(methods=["histogram"], log_t_bounds=[-2, 3])
    assert settings.methods == ("histogram",) and settings.log_t_bounds == (-2.0, 3.0)
    assert typed().baselines == BaselineSettings() == \
        BaselineSettings(("temperature", "histogram"), (-5.0, 5.0))


def test_baseline_table_fits_on_cal_and_reports_evaluation():
    """Per layer: T fit on the calibration rows only, metrics of the evaluation rows before and
    after, against fit_temperature / nll called directly."""
    from calibrate.core.posthoc import BaselineSettings, baseline_table, baselines_at

    logits0, labels = synthetic(n=200, scale=3.0, seed=1)
    logits = np.stack([logits0, logits0 * 0.5], axis=1)  # [N, 2 layers, K]
    cal, evaluation = np.arange(0, 200, 2), np.arange(1, 200, 2)
    table = baseline_table(logits, labels, cal, evaluation, BaselineSettings(), 10, "guo")
    assert sorted(set(table["method"])) == ["histogram", "temperature"]
    assert len(table) == 4  # two methods x two layers
    for layer in (0, 1):
        row = baselines_at(table, layer)["temperature"]
        t = fit_temperature(logits[cal, layer], labels[cal])
        assert row["parameter"] == pytest.approx(t, rel=1e-9)
        assert row["nll"] == pytest.approx(nll(logits[evaluation, layer], labels[evaluation], t))
        assert row["nll_before"] == pytest.approx(nll(logits[evaluation, layer],
                                                      labels[evaluation]))
        assert row["accuracy"] == row["accuracy_before"]  # T never changes the argmax
    # layer 1 holds the same logits halved: its fitted T is half of layer 0's
    temps = table[table["method"] == "temperature"].set_index("layer")["parameter"]
    assert temps[1] == pytest.approx(temps[0] / 2, rel=1e-4)
