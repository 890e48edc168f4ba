"""Paired bootstrap intervals of differences between arms scored on the same examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from calibrate.core.metrics import ece, mce
from calibrate.core.paired import (
    add_paired_columns,
    binned_errors,
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


def test_columns_for_a_steering_table_and_the_comparison_count():
    calibrated, overconfident, labels = arms(n=120)
    probs = np.stack([calibrated, overconfident])
    table = pd.DataFrame({"eta": [0.0, 4.0], "layer": [0, 0]})
    out = add_paired_columns(table, probs, labels, "eta", 0, 100, 0.05, 0, 15, "guo")
    assert list(out["eta"]) == [0.0, 4.0] and out.loc[0, "delta_ece_lo"] == 0.0
    note = multiple_comparisons(out, "eta", 0.0, 0.05)
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
