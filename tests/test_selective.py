"""Selective prediction: risk–coverage and AURC on hand-computed cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from calibrate.core.metrics import layer_table
from calibrate.core.selective import aurc, excess_aurc, optimal_aurc, risk_coverage


def test_risk_coverage_by_hand():
    # most confident first: right, wrong, right, right
    coverage, risk = risk_coverage([0.7, 0.9, 0.6, 0.8], [1, 1, 1, 0])
    np.testing.assert_array_equal(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 1 / 2, 1 / 3, 1 / 4], rtol=0, atol=1e-15)
    assert aurc([0.7, 0.9, 0.6, 0.8], [1, 1, 1, 0]) == pytest.approx(
        (0 + 1 / 2 + 1 / 3 + 1 / 4) / 4, abs=1e-15)  # 0.2708333...
    assert optimal_aurc([1, 1, 1, 0]) == pytest.approx((0 + 0 + 0 + 1 / 4) / 4, abs=1e-15)
    assert excess_aurc([0.7, 0.9, 0.6, 0.8], [1, 1, 1, 0]) == pytest.approx(
        (1 / 2 + 1 / 3) / 4, abs=1e-15)


def test_ties_take_the_expected_risk_over_their_orders():
    """Tied confidences: the risk at each coverage is the mean over every order of the tie."""
    conf = np.array([0.9, 0.5, 0.5, 0.5, 0.2])
    right = np.array([0, 1, 0, 1, 1])
    orders = []
    for perm in itertools.permutations([1, 2, 3]):
        idx = [0, *perm, 4]
        orders.append(np.cumsum(1 - right[idx]) / np.arange(1, 6))
    np.testing.assert_allclose(risk_coverage(conf, right)[1], np.mean(orders, axis=0),
                               rtol=0, atol=1e-15)
    shuffled = np.random.default_rng(0).permutation(5)
    assert aurc(conf[shuffled], right[shuffled]) == aurc(conf, right)


def test_extremes():
    assert aurc([0.9, 0.1], [1, 1]) == 0.0 and aurc([0.9, 0.1], [0, 0]) == 1.0
    assert excess_aurc([0.9, 0.8, 0.1], [1, 1, 0]) == 0.0  # a perfect ranking
    assert excess_aurc([0.9, 0.8, 0.1], [0, 1, 1]) > 0
    with pytest.raises(ValueError, match="one shape"):
        risk_coverage([0.5], [1, 0])


def test_layer_table_reports_aurc_per_layer():
    probs = np.array([[[0.3, 0.7], [0.9, 0.1]], [[0.4, 0.6], [0.2, 0.8]],
                      [[0.5, 0.5], [0.45, 0.55]]])  # [N=3, L=2, K=2]
    labels = np.array([1, 0, 1])
    table = layer_table(probs, labels, n_bins=5)
    for layer in range(2):
        conf = probs[:, layer].max(1)
        right = probs[:, layer].argmax(1) == labels
        assert table.loc[layer, "aurc"] == aurc(conf, right)
        assert table.loc[layer, "eaurc"] == pytest.approx(aurc(conf, right) - optimal_aurc(right),
                                                          abs=1e-15)
