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
    ("methods", [], "baselines.methods=[]; accepted: a non-empty list of temperature, histogram, bias, vector, isotonic, ensemble"),
    ("methods", "temperature",
     "baselines.methods=temperature; accepted: a non-empty list of temperature, histogram, bias, vector, isotonic, ensemble"),
    ("methods", ["platt"], ("baselines.methods=['platt']; accepted: a non-empty list of "
                            "temperature, histogram, bias, vector, isotonic, ensemble")),
    ("ensemble_max_layers", 0, "baselines.ensemble_max_layers=0; accepted: an integer >= 1"),
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
        BaselineSettings(("temperature", "histogram", "bias", "vector", "isotonic", "ensemble"),
                         (-5.0, 5.0), 8)


def test_baseline_table_fits_on_cal_and_reports_evaluation():
    """Per layer: T fit on the calibration rows only, metrics of the evaluation rows before and
    after, against fit_temperature / nll called directly."""
    from calibrate.core.posthoc import BaselineSettings, baseline_table, baselines_at

    logits0, labels = synthetic(n=200, scale=3.0, seed=1)
    logits = np.stack([logits0, logits0 * 0.5], axis=1)  # [N, 2 layers, K]
    cal, evaluation = np.arange(0, 200, 2), np.arange(1, 200, 2)
    settings = BaselineSettings(methods=("temperature", "histogram"))
    table = baseline_table(logits, labels, cal, evaluation, settings, 10, "guo")
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


# ---------------------------------------------------------------- bias, vector, isotonic, ensemble

def test_bias_is_minus_log_of_the_mean_calibration_distribution_by_hand():
    from calibrate.core.posthoc import apply_bias, fit_bias

    cal = np.array([[0.0, 0.0], [np.log(3.0), 0.0]])  # p = (.5, .5) and (.75, .25)
    bias = fit_bias(cal)  # mean (.625, .375)
    np.testing.assert_allclose(bias, [-np.log(0.625), -np.log(0.375)], rtol=1e-12)
    # softmax(-log a, -log b) = (b, a) / (a + b): the raw 50/50 becomes (.375, .625)
    np.testing.assert_allclose(apply_bias(np.array([[0.0, 0.0]]), bias), [[0.375, 0.625]])
    with_missing = np.array([[1.0, 0.0, -np.inf], [0.0, 1.0, -np.inf]])
    assert fit_bias(with_missing)[2] == 0.0  # a slot no example has


def test_vector_scaling_reaches_the_nll_minimum():
    """Against a derivative-free search of the same NLL; it is at least as good as temperature
    scaling (w = 1/T, b = 0 is one of its points)."""
    from scipy.optimize import minimize

    from calibrate.core.posthoc import apply_vector, fit_vector

    logits, labels = synthetic(n=300, scale=2.0, seed=4)
    logits = logits[:, :3]
    labels = np.minimum(labels, 2)
    w, b = fit_vector(logits, labels)

    def vec_nll(theta):
        p = apply_vector(logits, theta[:3], theta[3:])
        return float(-np.log(p[np.arange(len(labels)), labels]).mean())

    reference = minimize(vec_nll, np.r_[np.ones(3), np.zeros(3)], method="Nelder-Mead",
                         options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 40000,
                                  "maxfev": 40000})
    assert vec_nll(np.r_[w, b]) == pytest.approx(reference.fun, abs=1e-6)
    t = fit_temperature(logits, labels)
    assert vec_nll(np.r_[w, b]) <= nll(logits, labels, t) + 1e-9
    masked = logits.copy()
    masked[:5, 2] = -np.inf
    out = apply_vector(masked, w, b)
    assert (out[:5, 2] == 0).all() and np.allclose(out.sum(axis=1), 1.0)


def test_isotonic_by_hand():
    """Calibration confidences .6 .7 .8 .9 with correctness 1 0 1 1: pool-adjacent-violators
    gives .5 .5 1 1; between fitted points the map interpolates, outside it is clipped."""
    from calibrate.core.posthoc import apply_isotonic, fit_isotonic

    cal = np.array([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])
    model = fit_isotonic(cal, np.array([0, 1, 0, 0]))
    out = apply_isotonic(np.array([[0.65, 0.35], [0.75, 0.25], [0.95, 0.05], [0.45, 0.55]]),
                         model)
    np.testing.assert_allclose(out[:, 0], [0.5, 0.75, 1.0, 0.5], atol=1e-12)
    np.testing.assert_allclose(out[3], [0.5, 0.5], atol=1e-12)  # top label is option 1 there


def test_ensemble_window_is_chosen_by_calibration_nll_by_hand():
    """Three layers; the label's probability is .4, .9, .6 at layers 0, 1, 2 for every example:
    at layer 2 the windows give .6 (m=1), .75 (m=2), .633 (m=3): m = 2 has the lowest NLL."""
    from calibrate.core.posthoc import ensemble_probs, fit_ensemble

    p = np.array([0.4, 0.9, 0.6])
    probs = np.stack([np.stack([p, 1 - p], axis=1)] * 5)  # [5, 3 layers, 2]
    labels = np.zeros(5, dtype=int)
    assert fit_ensemble(probs, labels, 2, 8) == 2
    assert fit_ensemble(probs, labels, 2, 1) == 1  # the window is capped
    assert fit_ensemble(probs, labels, 0, 8) == 1  # only one layer there
    np.testing.assert_allclose(ensemble_probs(probs, 2, 2)[0], [0.75, 0.25])


def test_baseline_table_paired_intervals_against_the_raw_model():
    """At the tested layer every method's interval is the paired interval of (method − raw) on
    the same evaluation resamples, its p-value that of those replicates, Holm over the six
    methods; elsewhere no interval. The deltas are after − before at every layer."""
    from calibrate.core.metrics import MetricSettings
    from calibrate.core.option_scores import option_probabilities
    from calibrate.core.paired import adjust_p_values, paired_intervals
    from calibrate.core.posthoc import BaselineSettings, baseline_table

    logits0, labels = synthetic(n=240, scale=3.0, seed=2)
    logits = np.stack([logits0 * 0.3, logits0], axis=1)
    cal, evaluation = np.arange(0, 240, 2), np.arange(1, 240, 2)
    metrics = MetricSettings(bootstrap=50, paired_bootstrap=300, correction="holm", seed=3)
    table = baseline_table(logits, labels, cal, evaluation, BaselineSettings(), 15, "guo",
                           paired=metrics, tested_layer=1)
    assert set(table["method"]) == {"temperature", "histogram", "bias", "vector", "isotonic",
                                    "ensemble"}
    np.testing.assert_allclose(table["delta_ece"], table["ece"] - table["ece_before"])
    tested = table[table["tested"]]
    assert (tested["layer"] == 1).all() and len(tested) == 6
    assert table.loc[~table["tested"], "delta_ece_lo"].isna().all()
    raw = option_probabilities(logits[evaluation])[:, 1:2]
    t = fit_temperature(logits[cal, 1], labels[cal])
    after = apply_temperature(logits[evaluation, 1], t)[:, None]
    ci = paired_intervals(raw, after, labels[evaluation], 300, 0.05, 3, 15, "guo", [True])
    row = tested[tested["method"] == "temperature"].iloc[0]
    for key in ("delta_ece_lo", "delta_ece_hi", "p_ece"):
        assert row[key] == pytest.approx(float(ci[key].iloc[0]), abs=1e-12)
    np.testing.assert_allclose(tested["p_adjusted_ece"],
                               adjust_p_values(tested["p_ece"].to_numpy(), "holm"))
