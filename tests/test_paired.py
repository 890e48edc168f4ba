"""Paired bootstrap intervals of differences between arms scored on the same examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from calibrate.core.metrics import ece, mce
from calibrate.core.paired import (
    add_paired_columns,
    adjust_p_values,
    binned_errors,
    bootstrap_p_value,
    multiple_comparisons,
    paired_intervals,
)


def arms(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    p_true = np.clip(rng.uniform(0.55, 0.95, size=n), 0, 1)
    right = rng.random(n) < p_true
    pred = np.where(right, labels, 1 - labels)
    calibrated = np.zeros((n, 1, 2))
    calibrated[np.arange(n), 0, pred] = p_true
    calibrated[np.arange(n), 0, 1 - pred] = 1 - p_true
    overconfident = np.zeros_like(calibrated)
    sharp = np.minimum(p_true + 0.3, 0.999)
    overconfident[np.arange(n), 0, pred] = sharp
    overconfident[np.arange(n), 0, 1 - pred] = 1 - sharp
    return calibrated, overconfident, labels


def test_batched_errors_equal_the_reference_metrics():
    rng = np.random.default_rng(1)
    conf, correct = rng.uniform(0.5, 1.0, size=(4, 200)), rng.random((4, 200)) < 0.7
    got_ece, got_mce = binned_errors(conf, correct, n_bins=15)
    for row in range(4):
        assert got_ece[row] == pytest.approx(ece(conf[row], correct[row], n_bins=15), abs=1e-12)
        assert got_mce[row] == pytest.approx(mce(conf[row], correct[row], n_bins=15), abs=1e-12)


def test_an_arm_against_itself_has_a_zero_interval():
    calibrated, _, labels = arms()
    table = paired_intervals(calibrated, calibrated, labels, n_boot=50)
    assert (table.filter(like="delta_").to_numpy() == 0).all()
    assert not table.filter(like="significant_").to_numpy().any()


def test_a_clear_miscalibration_is_significant_and_the_point_lies_inside():
    calibrated, overconfident, labels = arms()
    table = paired_intervals(calibrated, overconfident, labels, n_boot=200, seed=3)
    point = ece(overconfident[:, 0].max(-1), overconfident[:, 0].argmax(-1) == labels) - \
        ece(calibrated[:, 0].max(-1), calibrated[:, 0].argmax(-1) == labels)
    assert table.loc[0, "delta_ece_lo"] > 0 and bool(table.loc[0, "significant_ece"])
    assert table.loc[0, "delta_ece_lo"] <= point <= table.loc[0, "delta_ece_hi"]
    # the same predictions: accuracy is unchanged in every resample
    assert table.loc[0, "delta_accuracy_lo"] == table.loc[0, "delta_accuracy_hi"] == 0.0


def test_intervals_equal_a_plain_loop_over_the_same_resamples():
    """The vectorised replicates against core.metrics.ece on each resample, one at a time."""
    calibrated, overconfident, labels = arms(n=150, seed=5)
    table = paired_intervals(calibrated, overconfident, labels, n_boot=80, alpha=0.1, seed=7)
    rng = np.random.default_rng(7)
    deltas = {"ece": [], "mce": [], "accuracy": []}
    for _ in range(80):
        idx = rng.integers(0, len(labels), size=len(labels))
        arm, ref = overconfident[idx, 0], calibrated[idx, 0]
        right_arm, right_ref = arm.argmax(-1) == labels[idx], ref.argmax(-1) == labels[idx]
        deltas["ece"].append(ece(arm.max(-1), right_arm) - ece(ref.max(-1), right_ref))
        deltas["mce"].append(mce(arm.max(-1), right_arm) - mce(ref.max(-1), right_ref))
        deltas["accuracy"].append(right_arm.mean() - right_ref.mean())
    for metric, values in deltas.items():
        lo, hi = np.quantile(values, [0.05, 0.95])
        assert table.loc[0, f"delta_{metric}_lo"] == pytest.approx(lo, abs=1e-12), metric
        assert table.loc[0, f"delta_{metric}_hi"] == pytest.approx(hi, abs=1e-12), metric


def _loop_deltas(reference, arm, labels, n_boot, seed, layer=0):
    """The documented resamples, one at a time: replicate b is the b-th
    ``rng.integers(0, N, size=N)`` draw of ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    out = {"ece": [], "mce": [], "accuracy": []}
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), size=len(labels))
        a, r = arm[idx, layer], reference[idx, layer]
        right_a, right_r = a.argmax(-1) == labels[idx], r.argmax(-1) == labels[idx]
        out["ece"].append(ece(a.max(-1), right_a) - ece(r.max(-1), right_r))
        out["mce"].append(mce(a.max(-1), right_a) - mce(r.max(-1), right_r))
        out["accuracy"].append(right_a.mean() - right_r.mean())
    return {k: np.array(v) for k, v in out.items()}


def test_a_95_percent_interval_is_the_2_5_and_97_5_percent_quantiles():
    """At the default alpha 0.05 the interval is np.quantile(.., [0.025, 0.975]) of the
    documented resamples; a 90 % interval ([0.05, 0.95]) is narrower and fails this."""
    calibrated, overconfident, labels = arms(n=140, seed=11)
    table = paired_intervals(calibrated, overconfident, labels, n_boot=120, seed=4)
    deltas = _loop_deltas(calibrated, overconfident, labels, 120, 4)
    for metric, values in deltas.items():
        lo, hi = np.quantile(values, [0.025, 0.975])
        assert table.loc[0, f"delta_{metric}_lo"] == pytest.approx(lo, abs=1e-12), metric
        assert table.loc[0, f"delta_{metric}_hi"] == pytest.approx(hi, abs=1e-12), metric
    narrow = np.quantile(deltas["ece"], [0.05, 0.95])
    assert narrow[0] > table.loc[0, "delta_ece_lo"] or narrow[1] < table.loc[0, "delta_ece_hi"]


def test_a_tested_layer_uses_its_own_replicates_and_gets_the_documented_p_value():
    """Layer 1 is tested with 300 replicates (the first 50 are layer 0's): its interval and
    p-value are those of the 300 documented resamples; layer 0 keeps 50 and has no p-value."""
    calibrated, overconfident, labels = arms(n=90, seed=2)
    ref = np.concatenate([calibrated, calibrated], axis=1)  # [N, 2, K]
    new = np.concatenate([overconfident, overconfident], axis=1)
    table = paired_intervals(ref, new, labels, n_boot=50, seed=9, tested=[False, True],
                             n_boot_tested=300)
    many, few = _loop_deltas(ref, new, labels, 300, 9, 1), _loop_deltas(ref, new, labels, 50, 9)
    for metric in ("ece", "mce", "accuracy"):
        lo, hi = np.quantile(many[metric], [0.025, 0.975])
        assert (table.loc[1, f"delta_{metric}_lo"], table.loc[1, f"delta_{metric}_hi"]) == \
            pytest.approx((lo, hi), abs=1e-12)
        lo0, hi0 = np.quantile(few[metric], [0.025, 0.975])
        assert (table.loc[0, f"delta_{metric}_lo"], table.loc[0, f"delta_{metric}_hi"]) == \
            pytest.approx((lo0, hi0), abs=1e-12)
        d = many[metric]
        expected = min(1.0, 2 * min(1 + np.sum(d <= 0), 1 + np.sum(d >= 0)) / 301)
        assert table.loc[1, f"p_{metric}"] == pytest.approx(expected, abs=1e-15)
        assert np.isnan(table.loc[0, f"p_{metric}"])


@pytest.mark.parametrize("deltas, expected", [
    ([1.0, 2.0, 3.0, 4.0], 2 * 1 / 5),            # every replicate above 0: the floor 2/(B+1)
    ([-1.0, -2.0, -3.0], 2 * 1 / 4),              # every replicate below 0
    ([-1.0, 0.0, 1.0, 2.0, 3.0], 1.0),            # 2 at or below, 4 at or above: 2*3/6 = 1
    ([-1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2 * 2 / 8),  # one below 0
    ([0.0, 0.0, 0.0], 1.0),                       # no change at all
])
def test_bootstrap_p_value_by_hand(deltas, expected):
    assert bootstrap_p_value(np.array(deltas)) == pytest.approx(expected, abs=1e-15)


def test_bootstrap_p_value_floor_with_2000_replicates():
    assert bootstrap_p_value(np.full(2000, 0.01)) == pytest.approx(2 / 2001, abs=1e-15)


P = np.array([0.01, 0.04, 0.03, np.nan, 0.005])


@pytest.mark.parametrize("method, expected", [
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): Holm 4p, 3p, 2p, 1p = .02 .03 .06 .04, running max
    ("holm", [0.03, 0.06, 0.06, np.nan, 0.02]),
    # BH m/j p = .02 .02 .04 .04, running min from the top
    ("bh", [0.02, 0.04, 0.04, np.nan, 0.02]),
    ("bonferroni", [0.04, 0.16, 0.12, np.nan, 0.02]),
    ("none", [0.01, 0.04, 0.03, np.nan, 0.005]),
])
def test_adjusted_p_values_by_hand(method, expected):
    np.testing.assert_allclose(adjust_p_values(P, method), expected, rtol=0, atol=1e-15)


def test_holm_and_bh_cap_at_one_and_keep_order():
    p = np.array([0.5, 0.6, 0.9])
    np.testing.assert_allclose(adjust_p_values(p, "holm"), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(adjust_p_values(p, "bh"), [0.9, 0.9, 0.9])
    with pytest.raises(ValueError, match="correction 'fdr'; accepted: holm, bh, bonferroni, none"):
        adjust_p_values(p, "fdr")


def test_only_cells_that_can_differ_are_tested_and_corrected():
    """Three arms over three layers, the edit at layer 2: the tested cells are the two non-
    reference arms at layer 2 only (2 cells), and only they carry p-values; Holm over them."""
    calibrated, overconfident, labels = arms(n=120)
    def layer(p):
        return np.concatenate([calibrated, calibrated, p], axis=1)

    probs = np.stack([layer(calibrated), layer(overconfident), layer(calibrated)])
    table = pd.DataFrame({"eta": np.repeat([0.0, 4.0, 8.0], 3), "layer": [0, 1, 2] * 3})
    out = add_paired_columns(table, probs, labels, "eta", 0, 60, 0.05, 0, 15, "guo",
                             first_layer=2, n_boot_tested=400, correction="holm")
    assert out["tested"].tolist() == [False, False, False, False, False, True,
                                      False, False, True]
    assert out["p_ece"].notna().tolist() == out["tested"].tolist()
    p = out.loc[out["tested"], "p_ece"].to_numpy()
    np.testing.assert_allclose(out.loc[out["tested"], "p_adjusted_ece"], adjust_p_values(p, "holm"))
    assert out.loc[8, "p_ece"] == 1.0  # the same probabilities as the reference: no difference
    note = multiple_comparisons(out, 0.05, "holm", 400)
    assert note["cells_tested"] == 2 and note["layers_tested"] == [2]
    assert note["bonferroni_alpha"] == pytest.approx(0.025)
    assert note["expected_false_positives"] == pytest.approx(0.1)
    assert note["p_floor"] == pytest.approx(2 / 401)
    assert note["flagged_ece"] == int(out.loc[out["tested"], "significant_ece"].sum())
    assert note["flagged_adjusted_ece"] == int((out.loc[out["tested"], "p_adjusted_ece"]
                                                <= 0.05).sum())
    assert note["flagged_adjusted_ece"] == 1  # the overconfident arm, p = 2/401 before Holm


def test_columns_for_a_steering_table_and_the_comparison_count():
    calibrated, overconfident, labels = arms(n=120)
    probs = np.stack([calibrated, overconfident])
    table = pd.DataFrame({"eta": [0.0, 4.0], "layer": [0, 0]})
    out = add_paired_columns(table, probs, labels, "eta", 0, 100, 0.05, 0, 15, "guo")
    assert list(out["eta"]) == [0.0, 4.0] and out.loc[0, "delta_ece_lo"] == 0.0
    note = multiple_comparisons(out, 0.05, "none", 100)
    assert note["cells_tested"] == 1 and note["bonferroni_alpha"] == pytest.approx(0.05)
    assert note["flagged_ece"] == int(out.loc[1, "significant_ece"])


def test_confidence_and_entropy_intervals_when_asked():
    """Δconfidence and Δentropy: the percentile interval of the same resamples, recomputed by
    hand; without asking, the table keeps its three metrics."""
    from scipy.special import xlogy

    calibrated, overconfident, labels = arms(120, seed=5)
    both = paired_intervals(calibrated, overconfident, labels, n_boot=40, seed=3,
                            metrics=("accuracy", "ece", "mce", "confidence", "entropy"))
    rng = np.random.default_rng(3)
    idx = np.stack([rng.integers(0, 120, size=120) for _ in range(40)])

    def entropy(p):
        return -xlogy(p, p).sum(-1)

    for metric, f in (("confidence", lambda p: p.max(-1)), ("entropy", entropy)):
        diffs = f(overconfident[:, 0])[idx].mean(1) - f(calibrated[:, 0])[idx].mean(1)
        lo, hi = np.quantile(diffs, [0.025, 0.975])
        assert both[f"delta_{metric}_lo"].iloc[0] == pytest.approx(lo)
        assert both[f"delta_{metric}_hi"].iloc[0] == pytest.approx(hi)
    assert both["significant_entropy"].iloc[0] and both["delta_entropy_hi"].iloc[0] < 0
    plain = paired_intervals(calibrated, overconfident, labels, n_boot=40, seed=3)
    assert not any("confidence" in c or "entropy" in c for c in plain.columns)
    pd.testing.assert_frame_equal(plain, both[plain.columns])
    with pytest.raises(ValueError, match="unknown metric"):
        paired_intervals(calibrated, overconfident, labels, metrics=("brier",))


def test_resamples_are_the_documented_draws_one_replicate_at_a_time():
    """One [B, n] draw equals B successive ``rng.integers(0, n, size=n)`` draws (odd and even
    n), is served again for the same arguments, and cannot be written to."""
    from calibrate.core.paired import resample_indices

    for n, seed in ((7, 3), (436, 0), (1, 5)):
        rng = np.random.default_rng(seed)
        expected = np.stack([rng.integers(0, n, size=n) for _ in range(50)])
        got = resample_indices(n, 50, seed)
        np.testing.assert_array_equal(got, expected)
        assert resample_indices(n, 50, seed) is got and not got.flags.writeable
    np.testing.assert_array_equal(resample_indices(7, 20, 3), resample_indices(7, 50, 3)[:20])


def test_paired_intervals_against_hand_resampled_differences():
    """Each layer's interval is ``np.quantile`` of the arm's minus the reference's metric on the
    documented resamples; a layer where both arms are equal has every difference exactly 0;
    a reference memo shared by two arms changes nothing."""
    from calibrate.core.paired import resample_indices

    calibrated, overconfident, labels = arms(120, seed=6)
    ref = np.concatenate([calibrated, calibrated], axis=1)  # [N, 2, K]
    arm = np.concatenate([calibrated, overconfident], axis=1)  # layer 0 unchanged
    idx = resample_indices(len(labels), 60, 11)
    conf_r, right_r = ref[:, 1].max(-1)[idx], (ref[:, 1].argmax(-1) == labels)[idx]
    conf_a, right_a = arm[:, 1].max(-1)[idx], (arm[:, 1].argmax(-1) == labels)[idx]
    d_ece = binned_errors(conf_a, right_a)[0] - binned_errors(conf_r, right_r)[0]
    d_acc = right_a.mean(1) - right_r.mean(1)
    memo: dict = {}
    for _ in range(2):  # the second call serves the reference from the memo
        table = paired_intervals(ref, arm, labels, n_boot=60, alpha=0.1, seed=11,
                                 tested=[False, True], reference_memo=memo)
        assert table.loc[0, ["delta_ece_lo", "delta_ece_hi", "delta_accuracy_lo",
                             "delta_mce_hi"]].tolist() == [0.0] * 4
        assert np.isnan(table.loc[0, "p_ece"])
        np.testing.assert_allclose(table.loc[1, ["delta_ece_lo", "delta_ece_hi"]].to_numpy(float),
                                   np.quantile(d_ece, [0.05, 0.95]), rtol=0, atol=1e-15)
        np.testing.assert_allclose(
            table.loc[1, ["delta_accuracy_lo", "delta_accuracy_hi"]].to_numpy(float),
            np.quantile(d_acc, [0.05, 0.95]), rtol=0, atol=1e-15)
        assert table.loc[1, "p_ece"] == bootstrap_p_value(d_ece)
    assert len(memo) == 1  # layer 1 only: the equal layer needs no resampling
    plain = paired_intervals(ref, arm, labels, n_boot=60, alpha=0.1, seed=11, tested=[False, True])
    pd.testing.assert_frame_equal(table, plain)


def test_a_reference_memo_shared_by_other_references_or_seeds_serves_each_its_own():
    """The memo is keyed by what the reference's replicates come from (its probabilities, the
    labels, the seed's draws): sharing one across other references or seeds changes nothing."""
    calibrated, overconfident, labels = arms(120, seed=7)
    memo: dict = {}
    for ref, arm, seed in [(calibrated, overconfident, 3), (overconfident, calibrated, 3),
                           (calibrated, overconfident, 4)]:
        shared = paired_intervals(ref, arm, labels, n_boot=50, seed=seed, reference_memo=memo)
        alone = paired_intervals(ref, arm, labels, n_boot=50, seed=seed)
        pd.testing.assert_frame_equal(shared, alone)
    assert len(memo) == 3


def test_layers_equal_in_both_arms_get_the_zero_differences_quantiles_and_p_value():
    """A layer whose arms are equal (below an edit) gets, for every metric, the quantiles and
    the bootstrap p-value of an all-zero difference of its number of replicates — as if every
    replicate had been computed — whether it is tested (n_boot_tested) or not (n_boot)."""
    calibrated, overconfident, labels = arms()
    reference = np.concatenate([calibrated, calibrated, calibrated], axis=1)
    arm = np.concatenate([calibrated, overconfident, calibrated], axis=1)
    table = paired_intervals(reference, arm, labels, n_boot=40, alpha=0.1, seed=2,
                             tested=[False, True, True], n_boot_tested=90)
    for layer, replicates in ((0, 40), (2, 90)):
        zeros = np.zeros(replicates)
        lo, hi = np.quantile(zeros, [0.05, 0.95])
        for metric in ("accuracy", "ece", "mce"):
            assert table.loc[layer, f"delta_{metric}_lo"] == lo
            assert table.loc[layer, f"delta_{metric}_hi"] == hi
            assert not table.loc[layer, f"significant_{metric}"]
    assert np.isnan(table.loc[0, "p_ece"])  # not tested
    assert table.loc[2, "p_ece"] == bootstrap_p_value(np.zeros(90)) == 1.0
    alone = paired_intervals(calibrated, overconfident, labels, n_boot=40, alpha=0.1, seed=2,
                             tested=[True], n_boot_tested=90)
    pd.testing.assert_series_equal(table.iloc[1], alone.iloc[0], check_names=False)
