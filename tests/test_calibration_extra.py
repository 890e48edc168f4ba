"""Tests of calibrate.core.calibration_extra: equal-mass (adaptive) ECE, Kumar et al.'s debiased
L2 calibration error and the smooth ECE (against relplot, the reference implementation)."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import calibrate.core.calibration_extra as X
from calibrate.core.calibration_extra import (
    EXTRA_METRICS,
    adaptive_ece,
    debiased_ece,
    equal_mass_bins,
    smooth_ece,
)
from calibrate.core.metrics import layer_table, option_metrics, softmax64

relplot = pytest.importorskip("relplot")


def _sample(rng: np.random.Generator, n: int, gap: float) -> tuple[np.ndarray, np.ndarray]:
    """Confidence ~ U(0.25, 1); correct ~ Bernoulli(confidence - gap) (gap > 0: overconfident)."""
    conf = rng.uniform(0.25, 1.0, n)
    return conf, (rng.random(n) < conf - gap).astype(np.float64)


def test_equal_mass_bins_sizes_ties_and_order() -> None:
    rng = np.random.default_rng(0)
    conf = rng.random(1000)
    idx = equal_mass_bins(conf, 15)
    count = np.bincount(idx, minlength=15)
    assert count.max() - count.min() <= 1 and count.sum() == 1000
    order = np.argsort(conf)
    assert np.all(np.diff(idx[order]) >= 0)  # contiguous in confidence
    np.testing.assert_array_equal(equal_mass_bins(np.arange(10) / 10, 3),
                                  [0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    # ties share a bin: six equal confidences of ten go to the first rank's bin
    tied = np.array([0.5] * 6 + [0.6, 0.7, 0.8, 0.9])
    np.testing.assert_array_equal(equal_mass_bins(tied, 5), [0] * 6 + [3, 3, 4, 4])
    correct = rng.integers(0, 2, 1000)
    perm = rng.permutation(1000)
    for fn in (adaptive_ece, debiased_ece):
        assert fn(conf[perm], correct[perm], 15) == pytest.approx(fn(conf, correct, 15), abs=1e-15)


def test_adaptive_ece_hand_computed() -> None:
    # bins {.2, .3}, {.6, .7}, {.9, .95}: acc .5, .5, 1; conf .25, .65, .925; weights 1/3
    conf = np.array([0.95, 0.2, 0.7, 0.3, 0.6, 0.9])
    correct = np.array([1, 0, 0, 1, 1, 1])
    assert adaptive_ece(conf, correct, n_bins=3) == pytest.approx(0.475 / 3, abs=1e-12)
    # one bin: |mean correct - mean confidence|; N bins: mean |correct - confidence|
    assert adaptive_ece(conf, correct, n_bins=1) == pytest.approx(abs(4 / 6 - 3.65 / 6), abs=1e-12)
    assert adaptive_ece(conf, correct, n_bins=6) == pytest.approx(
        np.mean(np.abs(correct - conf)), abs=1e-12)
    assert adaptive_ece(conf, correct, n_bins=50) == pytest.approx(  # more bins than examples
        np.mean(np.abs(correct - conf)), abs=1e-12)


def test_debiased_ece_hand_computed() -> None:
    conf = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    correct = np.array([1, 1, 1, 0, 0, 1, 1, 1, 0])
    # gaps 0.8, 1/6, 2/15; variance terms acc(1-acc)/(n-1): 0, 1/9, 1/9
    expected = np.sqrt((0.64 + 1 / 36 - 1 / 9 + 4 / 225 - 1 / 9) / 3)
    assert expected == pytest.approx(np.sqrt(139) / 30, abs=1e-15)
    assert debiased_ece(conf, correct, n_bins=3) == pytest.approx(expected, abs=1e-12)
    # the correction exceeds the squared gaps: the estimate is clipped at 0
    conf2, correct2 = np.array([0.2, 0.3, 0.6, 0.7, 0.9, 0.95]), np.array([0, 1, 1, 0, 1, 1])
    # (0.0625 - 0.25 + 0.0225 - 0.25 + 0.005625 - 0) / 3 < 0
    assert debiased_ece(conf2, correct2, n_bins=3) == 0.0
    # singleton bins add nothing (no variance estimate): one bin of 2 and two of 1
    conf3, correct3 = np.array([0.1, 0.1, 0.5, 0.9]), np.array([1, 1, 0, 1])
    assert debiased_ece(conf3, correct3, n_bins=3) == pytest.approx(np.sqrt(0.5 * 0.81), abs=1e-12)


def test_perfectly_calibrated_sample_gives_near_zero() -> None:
    conf, correct = _sample(np.random.default_rng(1), 20000, gap=0.0)
    plug_in_rms = np.sqrt(np.mean([(correct[b].mean() - conf[b].mean()) ** 2
                                   for b in np.array_split(np.argsort(conf), 15)]))
    assert adaptive_ece(conf, correct) < 0.02  # measured 0.0112
    assert debiased_ece(conf, correct) < 0.01  # measured 0.0042
    assert debiased_ece(conf, correct) < plug_in_rms  # the bias it removes
    assert smooth_ece(conf, correct) < 0.02  # measured 0.0102


@pytest.mark.parametrize("gap", [0.05, 0.1])
def test_constant_miscalibration_is_recovered(gap: float) -> None:
    conf, correct = _sample(np.random.default_rng(2), 20000, gap=gap)
    assert adaptive_ece(conf, correct) == pytest.approx(gap, abs=0.01)
    assert debiased_ece(conf, correct) == pytest.approx(gap, abs=0.01)
    assert smooth_ece(conf, correct) == pytest.approx(gap, abs=0.01)


def test_debiased_never_exceeds_its_plug_in() -> None:
    rng = np.random.default_rng(3)
    for seed in range(20):
        conf, correct = _sample(np.random.default_rng(seed), int(rng.integers(5, 400)), 0.05)
        n_bins = int(rng.integers(1, 20))
        idx = equal_mass_bins(conf, n_bins)
        plug = np.sqrt(sum(np.mean(idx == b) * (correct[idx == b].mean() - conf[idx == b].mean())
                           ** 2 for b in np.unique(idx)))
        assert 0.0 <= debiased_ece(conf, correct, n_bins) <= plug + 1e-15


def test_smooth_ece_matches_relplot() -> None:
    for seed, gap in enumerate([0.0, 0.03, 0.2, -0.1]):
        conf, correct = _sample(np.random.default_rng(seed), 3000, gap)
        reference = relplot.smECE(conf, correct)
        assert smooth_ece(conf, correct) == pytest.approx(reference, abs=1e-12)
    # relplot's module settings are pinned to its defaults while computing
    relplot.config.use_logit_scaling = True
    try:
        assert smooth_ece(conf, correct) == pytest.approx(reference, abs=1e-12)
        assert relplot.config.use_logit_scaling is True  # restored
    finally:
        relplot.config.use_logit_scaling = False


def test_layer_table_has_the_columns_per_layer() -> None:
    rng = np.random.default_rng(4)
    probs = softmax64(rng.normal(size=(400, 5, 4)) * 2)
    labels = rng.integers(0, 4, 400)
    table = layer_table(probs, labels, n_bins=10, extra_bins=(15,))
    assert list(table.columns[-5:]) == [*EXTRA_METRICS, "aurc", "eaurc"]
    for layer in range(5):
        conf = probs[:, layer].max(axis=1)
        correct = (probs[:, layer].argmax(axis=1) == labels).astype(np.float64)
        row = table.loc[layer]
        assert row["ece_adaptive"] == pytest.approx(adaptive_ece(conf, correct, 10), abs=1e-15)
        assert row["ece_debiased"] == pytest.approx(debiased_ece(conf, correct, 10), abs=1e-15)
        assert row["smece"] == pytest.approx(relplot.smECE(conf, correct), abs=1e-12)
    assert option_metrics(probs[:, 2], labels, n_bins=10)["smece"] == table.loc[2, "smece"]
    bare = layer_table(probs, labels, n_bins=10, extra_calibration=False)
    assert not {*EXTRA_METRICS, "aurc", "eaurc"} & set(bare.columns)


def test_smooth_ece_on_edge_samples_matches_relplot() -> None:
    """Confidences piled near 1 and all exactly 1 (the bandwidth search's hard cases)."""
    import relplot

    rng = np.random.default_rng(5)
    n = 2000
    near_one = 1 - rng.exponential(1e-4, n)
    for conf, correct in [(near_one, (rng.random(n) < near_one) * 1.0), (np.ones(n), np.ones(n))]:
        assert smooth_ece(conf, correct) == pytest.approx(float(relplot.smECE(conf, correct)),
                                                          abs=1e-12)


def test_validation() -> None:
    with pytest.raises(ValueError, match="n_bins"):
        adaptive_ece(np.array([0.5]), np.array([1]), n_bins=0)
    with pytest.raises(ValueError, match="n_bins"):
        debiased_ece(np.array([0.5]), np.array([1]), n_bins=True)
    with pytest.raises(ValueError, match="within \\[0, 1\\]"):
        smooth_ece(np.array([1.5]), np.array([1]))
    with pytest.raises(ValueError, match="0/1"):
        adaptive_ece(np.array([0.5]), np.array([2]))


def test_docstring_examples() -> None:
    result = doctest.testmod(X, extraglobs={"np": np})
    assert result.attempted >= 2 and result.failed == 0


def test_smooth_ece_matches_relplot_and_its_bandwidth_on_small_and_tied_samples() -> None:
    """The FFT recomputation against relplot's direct convolutions where the steering jobs use
    it: tens to hundreds of two-way confidences (>= 0.5), ties, piles near 1, and every
    bandwidth the search reaches (its chosen sigma is relplot's too)."""
    rng = np.random.default_rng(12)
    for trial in range(120):
        n = int(rng.integers(2, 600))
        kind = trial % 4
        conf = (rng.uniform(0.5, 1.0, n) if kind == 0 else
                1 - rng.exponential(10 ** rng.uniform(-5, -1), n).clip(0, 0.5) if kind == 1 else
                np.round(rng.uniform(0.5, 1.0, n), 2) if kind == 2 else rng.uniform(0, 1, n))
        correct = (rng.random(n) < np.clip(conf + rng.normal(0, 0.15), 0, 1)).astype(np.float64)
        value, width = relplot.smECE(conf, correct, return_width=True)
        assert smooth_ece(conf, correct) == pytest.approx(value, abs=1e-12)
        assert X._smooth_at(conf, conf - correct, width) == pytest.approx(value, abs=1e-12)


def test_layer_table_serves_repeated_layers_and_recomputes_changed_ones() -> None:
    """A layer measured again (the memo) gives the same row; one example changed in one layer
    gives that layer's new smece and aurc, not the remembered ones."""
    rng = np.random.default_rng(13)
    probs = softmax64(rng.normal(size=(150, 3, 2)) * 2)
    labels = rng.integers(0, 2, 150)
    first = layer_table(probs, labels, n_bins=10)
    again = layer_table(probs, labels, n_bins=10)
    assert first.equals(again)
    changed = probs.copy()
    changed[0, 1] = changed[0, 1, ::-1]  # flip one example's prediction at layer 1
    table = layer_table(changed, labels, n_bins=10)
    conf = changed[:, 1].max(axis=1)
    correct = (changed[:, 1].argmax(axis=1) == labels).astype(np.float64)
    assert table.loc[1, "smece"] == pytest.approx(relplot.smECE(conf, correct), abs=1e-12)
    assert table.loc[1, "smece"] != first.loc[1, "smece"]
    assert table.loc[1, "aurc"] != first.loc[1, "aurc"]
    assert table.drop(index=1).equals(first.drop(index=1))


def test_smooth_ece_takes_its_final_value_from_the_search_bit_for_bit(monkeypatch) -> None:
    """The final sigma was tried by the bandwidth search, so its smECE_sigma is not computed
    twice: the value equals the plain search's (every sigma computed when asked), and no sigma
    is computed more than once."""
    smooth_at = X._smooth_at

    def plain(conf: np.ndarray, corr: np.ndarray) -> float:
        residual = conf - corr
        sigma = 1.0
        if not (sigma < smooth_at(conf, residual, sigma)):
            start, end = 1.0, 0.0
            for _ in range(10):
                mid = (start + end) / 2
                if mid < X._SEARCH_EPS or mid < smooth_at(conf, residual, mid):
                    end = mid
                else:
                    start = mid
            sigma = start
        return smooth_at(conf, residual, sigma)

    calls: list[float] = []

    def counted(conf, residual, sigma):
        calls.append(sigma)
        return smooth_at(conf, residual, sigma)

    for seed, (n, gap) in enumerate([(50, 0.1), (400, 0.0), (3000, 0.2), (7, -0.3)]):
        conf, correct = _sample(np.random.default_rng(seed), n, gap)
        want = plain(conf, correct)
        calls.clear()
        monkeypatch.setattr(X, "_smooth_at", counted)
        got = X._smooth(conf, correct)
        monkeypatch.setattr(X, "_smooth_at", smooth_at)
        assert got == want
        assert len(calls) == len(set(calls))
