"""Tests of calibrate.core.metrics against torchmetrics, hand computations and known truths."""

from __future__ import annotations

import doctest

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error
from torchmetrics.functional.classification.calibration_error import _ce_compute

import calibrate.core.metrics as M
from calibrate.core.bootstrap import bootstrap_layer_ci
from calibrate.core.metrics import (
    bin_statistics,
    ece,
    layer_table,
    mce,
    option_metrics,
    rms_calibration_error,
    softmax64,
)

NORMS = {"l1": ece, "max": mce, "l2": rms_calibration_error}


def _random_probs(seed: int, n: int, k: int, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = softmax64(rng.normal(size=(n, k)) * scale)
    return probs, rng.integers(0, k, size=n)


def _top_label(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64)


def _min_edge_distance(conf: np.ndarray, n_bins: int) -> float:
    return float(np.min(np.abs(conf[:, None] - np.arange(n_bins + 1) / n_bins)))


@pytest.mark.parametrize("binning", ["guo", "torchmetrics"])
@pytest.mark.parametrize("k", [2, 4, 10])
@pytest.mark.parametrize("n_bins", [5, 10, 15, 23])
def test_matches_torchmetrics_off_edges(binning: str, k: int, n_bins: int) -> None:
    probs, labels = _random_probs(seed=100 * k + n_bins, n=2000, k=k)
    conf, correct = _top_label(probs, labels)
    # continuous data: no confidence within float32 reach of an edge, so both rules agree
    assert _min_edge_distance(conf, n_bins) > 1e-6
    for norm, ours in NORMS.items():
        value = ours(conf, correct, n_bins=n_bins, binning=binning)
        # torchmetrics' core in float64 (what multiclass_calibration_error delegates to)
        core = _ce_compute(torch.from_numpy(conf), torch.from_numpy(correct), n_bins, norm)
        assert value == pytest.approx(float(core), abs=1e-12, rel=0)
        # the public wrapper casts confidences to float32, hence the looser tolerance
        public = multiclass_calibration_error(
            torch.from_numpy(probs), torch.from_numpy(labels), k, n_bins=n_bins, norm=norm
        )
        assert value == pytest.approx(float(public), abs=2e-6, rel=0)


def test_option_metrics_ece_mce_match_torchmetrics() -> None:
    probs, labels = _random_probs(seed=7, n=500, k=4)
    got = option_metrics(probs, labels, n_bins=15, extra_bins=(10,))
    conf, correct = _top_label(probs, labels)
    t_conf, t_acc = torch.from_numpy(conf), torch.from_numpy(correct)
    assert got["ece"] == pytest.approx(float(_ce_compute(t_conf, t_acc, 15, "l1")), abs=1e-12)
    assert got["mce"] == pytest.approx(float(_ce_compute(t_conf, t_acc, 15, "max")), abs=1e-12)
    assert got["rmsce"] == pytest.approx(float(_ce_compute(t_conf, t_acc, 15, "l2")), abs=1e-12)
    assert got["ece_10"] == pytest.approx(float(_ce_compute(t_conf, t_acc, 10, "l1")), abs=1e-12)
    assert got["mce_10"] == pytest.approx(float(_ce_compute(t_conf, t_acc, 10, "max")), abs=1e-12)


def test_hand_computed_example() -> None:
    # 5 bins, edges 0 .2 .4 .6 .8 1
    # bin (0.8, 1]: 0.95 right, 0.85 wrong -> acc 0.5,  conf 0.9   -> gap 0.4,   weight 2/5
    # bin (0.6,.8]: 0.70 right, 0.65 right -> acc 1.0,  conf 0.675 -> gap 0.325, weight 2/5
    # bin (0.2,.4]: 0.30 wrong             -> acc 0.0,  conf 0.3   -> gap 0.3,   weight 1/5
    # ECE = 0.4*0.4 + 0.4*0.325 + 0.2*0.3 = 0.16 + 0.13 + 0.06 = 0.35
    # MCE = 0.4;  RMSCE = sqrt(0.4*0.16 + 0.4*0.105625 + 0.2*0.09) = sqrt(0.12425)
    conf = np.array([0.95, 0.85, 0.70, 0.65, 0.30])
    correct = np.array([True, False, True, True, False])
    for binning in ("guo", "torchmetrics"):
        assert ece(conf, correct, n_bins=5, binning=binning) == pytest.approx(0.35, abs=1e-12)
        assert mce(conf, correct, n_bins=5, binning=binning) == pytest.approx(0.4, abs=1e-12)
        rms = rms_calibration_error(conf, correct, n_bins=5, binning=binning)
        assert rms == pytest.approx(np.sqrt(0.12425), abs=1e-12)
    stats = bin_statistics(conf, correct, n_bins=5)
    np.testing.assert_array_equal(stats.count, [0, 1, 0, 2, 2])
    np.testing.assert_allclose(stats.accuracy[[1, 3, 4]], [0.0, 1.0, 0.5])
    np.testing.assert_allclose(stats.mean_confidence[[1, 3, 4]], [0.3, 0.675, 0.9])
    assert np.isnan(stats.accuracy[[0, 2]]).all() and np.isnan(stats.mean_confidence[[0, 2]]).all()


@pytest.mark.parametrize("n_bins", [10, 15])
def test_edge_rule(n_bins: int) -> None:
    """Our documented edge rule, and how torchmetrics differs.

    guo:          0.0 -> bin 0 (closed at 0); 1/M -> bin 0 (right-closed); 2/M -> bin 1;
                  1.0 -> bin M-1 (the last bin).
    torchmetrics: 0.0 -> bin 0; 1/M -> bin 1; 2/M -> bin 2 (left-closed); 1.0 -> slot M, an
                  extra slot after the M regular bins.
    """
    edges_hit = np.array([0.0, 1 / n_bins, 2 / n_bins, 1.0])
    np.testing.assert_array_equal(M.bin_index(edges_hit, n_bins, "guo"), [0, 0, 1, n_bins - 1])
    tm = M.bin_index(edges_hit, n_bins, "torchmetrics")
    np.testing.assert_array_equal(tm, [0, 1, 2, n_bins])
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    reference = torch.bucketize(torch.from_numpy(edges_hit), boundaries, right=True) - 1
    np.testing.assert_array_equal(tm, reference.numpy())
    assert len(bin_statistics(edges_hit, np.ones(4), n_bins, "guo").count) == n_bins
    assert len(bin_statistics(edges_hit, np.ones(4), n_bins, "torchmetrics").count) == n_bins + 1


def test_edge_rule_changes_ece_and_torchmetrics_mode_matches_torchmetrics() -> None:
    # at exact edges the two rules disagree (10 bins): 0.2 joins 0.15 in (0.1, 0.2] under guo
    # but opens [0.2, 0.3) under torchmetrics; 1.0 joins 0.95 under guo only
    conf, correct = np.array([0.15, 0.2, 0.95, 1.0]), np.array([1.0, 0.0, 0.0, 1.0])
    guo = ece(conf, correct, n_bins=10, binning="guo")
    tm = ece(conf, correct, n_bins=10, binning="torchmetrics")
    # guo: {.15, .2}: acc .5 conf .175 -> .325 ; {.95, 1}: acc .5 conf .975 -> .475 ; ECE .4
    assert guo == pytest.approx(0.4, abs=1e-12)
    # torchmetrics: four singleton slots: (.85 + .2 + .95 + 0) / 4 = 0.5
    assert tm == pytest.approx(0.5, abs=1e-12)
    core = _ce_compute(torch.from_numpy(conf), torch.from_numpy(correct), 10, "l1")
    assert tm == pytest.approx(float(core), abs=1e-12)


def test_brier_nll_entropy_by_hand() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    labels = np.array([0, 2])
    got = option_metrics(probs, labels, n_bins=10)
    # Brier: (0.3^2 + 0.2^2 + 0.1^2) = 0.14 ; (0.1^2 + 0.6^2 + 0.7^2) = 0.86 ; mean 0.5
    assert got["brier"] == pytest.approx(0.5, abs=1e-12)
    assert got["nll"] == pytest.approx(-(np.log(0.7) + np.log(0.3)) / 2, abs=1e-12)
    h1 = -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1))
    h2 = -(0.1 * np.log(0.1) + 0.6 * np.log(0.6) + 0.3 * np.log(0.3))
    assert got["entropy"] == pytest.approx((h1 + h2) / 2, abs=1e-12)
    assert got["accuracy"] == 0.5
    assert got["confidence"] == pytest.approx(0.65, abs=1e-12)
    assert list(got) == ["accuracy", "confidence", "ece", "mce", "rmsce", "brier", "nll", "entropy",
                         "ece_adaptive", "ece_debiased", "smece", "aurc", "eaurc"]
    assert list(option_metrics(probs, labels, extra_calibration=False)) == list(got)[:8]


def test_nll_finite_at_zero_probability_and_entropy_of_one_hot() -> None:
    got = option_metrics(np.array([[1.0, 0.0]]), np.array([1]))
    assert got["nll"] == pytest.approx(-np.log(np.finfo(np.float64).tiny))
    assert np.isfinite(got["nll"]) and got["entropy"] == 0.0
    assert got["brier"] == pytest.approx(2.0)


def test_ties_go_to_the_lowest_index() -> None:
    probs = np.array([[0.4, 0.4, 0.2], [0.2, 0.4, 0.4]])
    assert option_metrics(probs, np.array([0, 1]))["accuracy"] == 1.0
    assert option_metrics(probs, np.array([1, 2]))["accuracy"] == 0.0


def test_softmax64_does_not_saturate() -> None:
    logits = np.array([[0.0, 20.0, 0.0, 0.0]], dtype=np.float32)
    assert torch.softmax(torch.from_numpy(logits), -1).max().item() == 1.0  # the fp32 trap
    p = softmax64(logits)
    assert p.dtype == np.float64
    assert p.max() < 1.0
    assert p[0, 1] == pytest.approx(1 / (1 + 3 * np.exp(-20.0)), rel=1e-15)
    shifted = softmax64(np.array([[1000.0, 1001.0]]))
    np.testing.assert_allclose(shifted, softmax64(np.array([[0.0, 1.0]])), rtol=1e-15)
    np.testing.assert_array_equal(softmax64(np.array([0.0, -np.inf])), [1.0, 0.0])


def test_layer_table_shape_and_columns() -> None:
    rng = np.random.default_rng(3)
    probs = softmax64(rng.normal(size=(50, 6, 4)))
    labels = rng.integers(0, 4, 50)
    table = layer_table(probs, labels, n_bins=15, extra_bins=(10,))
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns) == [
        "layer", "accuracy", "confidence", "ece", "mce", "rmsce", "brier", "nll", "entropy",
        "ece_10", "mce_10", "ece_adaptive", "ece_debiased", "smece", "aurc", "eaurc",
    ]
    assert table.shape == (6, 16)
    assert table["layer"].tolist() == list(range(6))
    row = option_metrics(probs[:, 4], labels, extra_bins=(10,))
    for key, value in row.items():
        assert table.loc[4, key] == pytest.approx(value, abs=1e-15)


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (np.full((3, 2, 4), 0.25), np.zeros(4, int), "labels must be 1-D with N = 3"),
        (np.full((0, 2, 4), 0.25), np.zeros(0, int), "N == 0"),
        (np.full((3, 2, 4), np.nan), np.zeros(3, int), "non-finite"),
        (np.full((3, 2, 4), 0.25), np.array([0, 1, 4]), r"labels must lie in \[0, 3\]"),
        (np.full((3, 2, 4), 0.25), np.array([0, -1, 2]), "labels must lie"),
        (np.full((3, 2, 4), 0.25), np.array([0.0, 1.0, 2.0]), "labels must be integers"),
        (np.full((3, 2, 4), 0.3), np.zeros(3, int), "sum to 1"),
        (np.full((3, 4), 0.25), np.zeros(3, int), "3 dimensions"),
        (np.full((3, 2, 4), 0.25) * np.array([1, 1, 3, -1]), np.zeros(3, int), r"\[0, 1\]"),
    ],
)
def test_layer_table_validation(probs: np.ndarray, labels: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        layer_table(probs, labels)


def test_argument_validation() -> None:
    conf, correct = np.array([0.3, 0.9]), np.array([0, 1])
    with pytest.raises(ValueError, match="'equal'.*guo, torchmetrics"):
        ece(conf, correct, binning="equal")
    with pytest.raises(ValueError, match="n_bins"):
        ece(conf, correct, n_bins=0)
    with pytest.raises(ValueError, match="within \\[0, 1\\]"):
        ece(np.array([0.3, 1.2]), correct)
    with pytest.raises(ValueError, match="equal length"):
        ece(conf, np.array([1]))
    with pytest.raises(ValueError, match="0/1"):
        ece(conf, np.array([0, 2]))
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        bootstrap_layer_ci(np.full((3, 2, 2), 0.5), np.zeros(3, int), "f1")
    with pytest.raises(ValueError, match="unknown method 'bca'"):
        bootstrap_layer_ci(np.full((3, 2, 2), 0.5), np.zeros(3, int), "ece", method="bca")
    with pytest.raises(ValueError, match="ece only"):
        bootstrap_layer_ci(np.full((3, 2, 2), 0.5), np.zeros(3, int), "mce", method="adjusted")
    with pytest.raises(ValueError, match="ece_margin"):
        bootstrap_layer_ci(np.full((3, 2, 2), 0.5), np.zeros(3, int), "ece", ece_margin=-1.0)
    with pytest.raises(ValueError, match="n_bins"):
        option_metrics(np.full((3, 2), 0.5), np.zeros(3, int), extra_bins=(0,))


@pytest.mark.parametrize("binning", ["guo", "torchmetrics"])
def test_bootstrap_replicate_equals_direct_computation(binning: str) -> None:
    """A vectorized replicate equals the metric recomputed on the resampled examples."""
    rng = np.random.default_rng(11)
    n = 300
    probs = softmax64(rng.normal(size=(n, 5, 4)) * 2)
    probs[:7, 2] = [1.0, 0.0, 0.0, 0.0]  # exercise the torchmetrics 1.0 slot
    labels = rng.integers(0, 4, n)
    seed = 5
    idx = np.random.default_rng(seed).integers(0, n, size=n)
    expected = layer_table(probs[idx], labels[idx], n_bins=10, binning=binning)
    for metric in M.METRICS:
        ci = bootstrap_layer_ci(
            probs, labels, metric, n_boot=1, seed=seed, n_bins=10, binning=binning,
            method="percentile",  # the raw replicate: no widening to the point estimate
        )
        np.testing.assert_allclose(ci["lo"], expected[metric], rtol=0, atol=1e-12)
        np.testing.assert_allclose(ci["hi"], expected[metric], rtol=0, atol=1e-12)


def test_bootstrap_shares_indices_across_layers_and_ignores_batch_size() -> None:
    rng = np.random.default_rng(2)
    one = softmax64(rng.normal(size=(80, 1, 3)))
    probs, labels = np.repeat(one, 4, axis=1), rng.integers(0, 3, 80)
    a = bootstrap_layer_ci(probs, labels, "ece", n_boot=50, seed=1, batch_size=7)
    b = bootstrap_layer_ci(probs, labels, "ece", n_boot=50, seed=1, batch_size=50)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=1e-14)
    # identical layers get identical intervals only if every layer sees the same resample
    assert a["lo"].nunique() == 1 and a["hi"].nunique() == 1
    assert list(a.columns) == ["layer", "ece", "lo", "hi"]
    assert (a["lo"] <= a["ece"]).all() and (a["ece"] <= a["hi"]).all()


def test_bootstrap_accuracy_interval_covers_truth() -> None:
    """Bernoulli(0.7) correctness at fixed confidence: the 95% CI covers 0.7 ~95% of the time."""
    truth, n, reps = 0.7, 100, 200
    rng = np.random.default_rng(1234)
    covered = 0
    for rep in range(reps):
        correct = rng.random(n) < truth
        probs = np.tile([[[0.8, 0.2]]], (n, 2, 1))
        labels = np.where(correct, 0, 1)
        ci = bootstrap_layer_ci(probs, labels, "accuracy", n_boot=200, seed=rep)
        covered += bool(ci.loc[0, "lo"] <= truth <= ci.loc[0, "hi"])
    assert 0.88 <= covered / reps <= 0.99


# ------------------------------------------------------------ the ECE interval (bias-aware)

def _synthetic(rng: np.random.Generator, n: int, gaps: list, k: int = 4) -> tuple:
    """probs [n, len(gaps), k], labels all 0: at "layer" j the top-label confidence is
    c ~ Uniform(1/k, 1) and the top option is the label with probability c + gaps[j](c); the
    other options share 1 - c equally (so c is the top probability)."""
    conf = rng.uniform(1 / k, 1.0, size=(n, len(gaps)))
    p_correct = np.stack([conf[:, j] + gap(conf[:, j]) for j, gap in enumerate(gaps)], axis=1)
    correct = rng.random((n, len(gaps))) < p_correct
    probs = np.repeat(((1 - conf) / (k - 1))[..., None], k, axis=-1)
    np.put_along_axis(probs, np.where(correct, 0, 1)[..., None], conf[..., None], axis=-1)
    return probs, np.zeros(n, dtype=int)


# P(correct | c) - c for each synthetic layer, and the true binned ECE (15 bins) by hand:
# calibrated: 0 in every bin -> 0; a constant gap -d: every bin's |E[gap | bin]| = d -> d;
# overconfident by 0.1 only above 0.6 (= 9/15, a bin edge): 0.1 * P(c > 0.6) = 0.1 * 0.4 / 0.75
COVERAGE_GAPS = [lambda c: 0.0 * c, lambda c: -0.05 + 0.0 * c,
                 lambda c: np.where(c > 0.6, -0.1, 0.0), lambda c: -0.2 + 0.0 * c]
COVERAGE_TRUTH = np.array([0.0, 0.05, 0.1 * 0.4 / 0.75, 0.2])


def test_ece_interval_covers_the_true_calibration_error() -> None:
    """200 seeded data sets of 300 examples with known calibration: the ECE interval covers
    the true binned ECE about 95% of the time (conservatively, up to 100%, where the bin gaps
    are comparable to their noise); the old percentile interval almost never does."""
    reps, n = 200, 300
    covered = {"adjusted": np.zeros(4), "percentile": np.zeros(4)}
    width = {"adjusted": np.zeros(4), "percentile": np.zeros(4)}
    excludes_point = {"adjusted": np.zeros(4), "percentile": np.zeros(4)}
    for rep in range(reps):
        probs, labels = _synthetic(np.random.default_rng(rep), n, COVERAGE_GAPS)
        for method in covered:
            ci = bootstrap_layer_ci(probs, labels, "ece", n_boot=200, seed=rep, method=method)
            lo, hi = ci["lo"].to_numpy(), ci["hi"].to_numpy()
            covered[method] += (lo <= COVERAGE_TRUTH) & (COVERAGE_TRUTH <= hi)
            width[method] += hi - lo
            point = ci["ece"].to_numpy()
            excludes_point[method] += (point < lo) | (point > hi)
    new, old = covered["adjusted"] / reps, covered["percentile"] / reps
    # measured: new 0.99 0.99 0.985 0.95; old 0.0 0.025 0.005 0.975
    assert np.all((new >= 0.90) & (new <= 1.0)), new
    assert 0.90 <= new[3] <= 0.99, new  # clearly miscalibrated: near nominal, not trivial
    assert old[0] == 0.0 and old[1] <= 0.1 and old[2] <= 0.1, old  # percentile: fails
    assert np.all(width["adjusted"] <= 2.0 * width["percentile"])  # not covering by width
    # the percentile interval even excludes its own plug-in ECE, most often when calibrated
    assert excludes_point["percentile"][0] / reps >= 0.1, excludes_point  # measured 0.2
    assert not excludes_point["adjusted"].any()


def _check_contains(probs: np.ndarray, labels: np.ndarray, **kw) -> None:
    for metric in ("ece", "accuracy"):
        ci = bootstrap_layer_ci(probs, labels, metric, **kw)
        assert (ci["lo"] <= ci[metric]).all() and (ci[metric] <= ci["hi"]).all(), (metric, ci)
        assert (ci["lo"] >= 0).all() and (ci["hi"] <= 1).all()


@pytest.mark.parametrize("binning", ["guo", "torchmetrics"])
def test_ece_and_accuracy_intervals_contain_their_point_estimate(binning: str) -> None:
    kw = {"n_boot": 100, "binning": binning}
    for seed, (n, k) in enumerate([(5, 2), (30, 4), (200, 4), (400, 10)]):
        probs, labels = _random_probs(seed, n * 8, k, scale=3.0)
        _check_contains(probs.reshape(n, 8, k), labels[:n], seed=seed, **kw)
    calibrated, labels = _synthetic(np.random.default_rng(9), 150, COVERAGE_GAPS)
    _check_contains(calibrated, labels, **kw)
    _check_contains(np.full((1, 2, 2), 0.5), np.zeros(1, int), **kw)  # one example
    certain = np.tile([[[1.0, 0.0]]], (40, 3, 1))  # confidence exactly 1.0, all right
    _check_contains(certain, np.zeros(40, int), **kw)
    _check_contains(certain, np.r_[np.ones(39, int), 0], **kw)  # 1 right of 40


def test_ece_interval_large_sample_limits_by_hand() -> None:
    """One bin, n = 20000. Confidence 0.9, accuracy 0.7: ECE 0.2 with the normal interval
    0.2 +- 1.96 * sqrt(0.21 / n). Confidence 0.7, accuracy exactly 0.7: ECE 0, lower bound 0,
    upper bound 1.96 * sqrt(0.21 / n) (the root at a gap of +3 standard errors is linear)."""
    n = 20000
    half = 1.96 * np.sqrt(0.21 / n)
    labels = (np.arange(n) >= round(0.7 * n)).astype(int)  # 70% label 0
    for conf, ece_value, lo, hi in [(0.9, 0.2, 0.2 - half, 0.2 + half), (0.7, 0.0, 0.0, half)]:
        probs = np.tile([[[conf, 1 - conf]]], (n, 1, 1))
        ci = bootstrap_layer_ci(probs, labels, "ece", n_boot=400, seed=3)
        assert ci.loc[0, "ece"] == pytest.approx(ece_value, abs=1e-12)
        assert ci.loc[0, "lo"] == pytest.approx(lo, abs=0.15 * half)
        assert ci.loc[0, "hi"] == pytest.approx(hi, abs=0.15 * half)
    assert ci.loc[0, "lo"] == 0.0


def test_docstring_examples() -> None:
    result = doctest.testmod(M, extraglobs={"np": np})
    assert result.attempted >= 1 and result.failed == 0


# ---------------------------------------------------------------- the metrics group, checked

@pytest.mark.parametrize("key, value, named, accepted", [
    ("n_bins", 0, "metrics.n_bins=0", "an integer >= 1"),
    ("n_bins", "15", "metrics.n_bins='15'", "an integer >= 1"),
    ("n_bins", True, "metrics.n_bins=True", "an integer >= 1"),
    ("extra_bins", [10, 0], "metrics.extra_bins[]=0", "an integer >= 1"),
    ("extra_bins", 10, "metrics.extra_bins=10", "a list of integers >= 1"),
    ("extra_bins", "10", "metrics.extra_bins='10'", "a list of integers >= 1"),
    ("binning", "x", "metrics.binning='x'", "guo, torchmetrics"),
    ("bootstrap", -1, "metrics.bootstrap=-1", "an integer >= 0"),
    ("alpha", 0, "metrics.alpha=0", "a number strictly between 0 and 1"),
    ("alpha", 1.0, "metrics.alpha=1.0", "a number strictly between 0 and 1"),
    ("seed", -1, "metrics.seed=-1", "an integer >= 0"),
    ("ece_margin", -0.5, "metrics.ece_margin=-0.5", "a number >= 0"),
])
def test_metric_settings_reject(key, value, named, accepted):
    import re

    from calibrate.core.metrics import MetricSettings
    from calibrate.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(named) + ".*" + re.escape(accepted)):
        MetricSettings(**{key: value})


def test_metric_settings_defaults_and_the_composed_group():
    from conftest import typed

    from calibrate.core.metrics import MetricSettings

    default = MetricSettings()
    assert (default.n_bins, default.binning, default.extra_bins, default.bootstrap, default.alpha,
            default.seed, default.ece_margin) == (15, "guo", (10,), 0, 0.05, 0, 3.0)
    settings = MetricSettings(n_bins=10, binning="torchmetrics", extra_bins=[5, 20], bootstrap=0,
                              alpha=0.1, ece_margin=0)
    assert settings.extra_bins == (5, 20)  # a list in the config, a tuple once checked
    composed = typed("metrics.n_bins=10", "metrics.extra_bins=[5,20]").metrics
    assert (composed.n_bins, composed.extra_bins, composed.bootstrap) == (10, (5, 20), 200)
