"""The random-direction null and the truncation's null: p-values on hand-computed deltas.

Every example below has label 0 and two options with logits ``[a, 0]`` (a > 0): the answer is
right, the confidence is σ(a), all examples share one bin, so the ECE is 1 − σ(a) and a
direction that moves a from a₀ to a_d has ΔECE = σ(a₀) − σ(a_d), known exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from calibrate.core.random_null import direction_null, empirical_p, subspace_null

N = 4
LABELS = np.zeros(N, dtype=int)
RANDOM_A = [1.0, 2.5, 4.0, 5.0, 6.0]  # ΔECE σ(2) − σ(a): +, −small, then ever more negative
A0 = 2.0


def _logits(a: float) -> np.ndarray:
    out = np.zeros((N, 2))
    out[:, 0] = a
    return out


def _null_logits(c_hat_a: float, etas_a: list[list[float]] | None = None) -> np.ndarray:
    """[1 + n, E = 2, N, K]: η = 0 reads a₀ for every direction, η ≠ 0 reads ĉ's a, then the
    random ones'."""
    rows = []
    for a in [c_hat_a, *RANDOM_A]:
        rows.append(np.stack([_logits(A0), _logits(a)]))
    return np.stack(rows)


def _delta(a: float) -> float:
    return float(expit(A0) - expit(a))


@pytest.mark.parametrize("c_hat_a, below, above", [
    (3.0, 3, 2),    # σ(2) − σ(3): the randoms at a = 4, 5, 6 lower ECE more; a = 1, 2.5 less
    (10.0, 0, 5),   # ĉ lowers ECE more than every random direction: the floor 1 / (n + 1)
    (0.5, 5, 0),    # ĉ raises ECE more than every random direction: p = 1
])
def test_direction_null_p_value_on_known_deltas(c_hat_a, below, above):
    n = len(RANDOM_A)
    table = direction_null(_null_logits(c_hat_a), LABELS, (0.0, 1.0), 15, "guo")
    row = table.iloc[0]
    assert row["eta"] == 1.0 and row["n_random"] == n
    assert row["c_hat_delta_ece"] == pytest.approx(_delta(c_hat_a), abs=1e-12)
    assert row["p_value_ece"] == pytest.approx((1 + below) / (1 + n), abs=1e-15)
    assert row["p_value_ece_two_sided"] == pytest.approx(
        min(1.0, 2 * min(1 + below, 1 + above) / (1 + n)), abs=1e-15)
    assert row["p_resolution"] == pytest.approx(1 / (1 + n))
    deltas = sorted(_delta(a) for a in RANDOM_A)
    assert row["null_delta_ece_median"] == pytest.approx(np.quantile(deltas, 0.5), abs=1e-12)
    assert (row["null_delta_ece_p05"], row["null_delta_ece_p95"]) == pytest.approx(
        tuple(np.quantile(deltas, [0.05, 0.95])), abs=1e-12)


def test_direction_null_extremes_are_1_over_n_plus_1_and_1():
    low = direction_null(_null_logits(10.0), LABELS, (0.0, 1.0), 15, "guo").iloc[0]
    high = direction_null(_null_logits(0.5), LABELS, (0.0, 1.0), 15, "guo").iloc[0]
    assert low["p_value_ece"] == 1 / 6 and high["p_value_ece"] == 1.0


@pytest.mark.parametrize("c_hat_a, below", [(3.0, 3), (10.0, 0), (0.5, 5)])
def test_truncation_p_value_is_the_lower_tail(c_hat_a, below):
    """The truncation's ΔECE against random k-subspaces removed the same way: small p when the
    truncation lowers ECE more than the controls (the lower tail), (1 + #{≤}) / (1 + n)."""
    controls = np.stack([_logits(a) for a in RANDOM_A])
    out = subspace_null(controls, _logits(A0), LABELS, _delta(c_hat_a), 15, "guo")
    n = len(RANDOM_A)
    assert out["n_control"] == n
    assert out["p_value_ece"] == pytest.approx((1 + below) / (1 + n), abs=1e-15)
    assert out["p_resolution"] == pytest.approx(1 / (1 + n))
    assert out["control_delta_ece_median"] == pytest.approx(_delta(4.0), abs=1e-12)


@pytest.mark.parametrize("value, tail, expected", [
    (0.0, "low", 4 / 6), (0.0, "high", 4 / 6), (0.0, "two", 1.0),
    (0.5, "low", 4 / 6), (0.5, "high", 3 / 6), (0.5, "two", 1.0),
    (-9.0, "low", 1 / 6), (-9.0, "high", 1.0), (-9.0, "two", 2 / 6),
    (9.0, "low", 1.0), (9.0, "high", 1 / 6), (9.0, "two", 2 / 6),
])
def test_empirical_p_by_hand(value, tail, expected):
    null = np.array([-2.0, -1.0, 0.0, 1.0, 2.0, np.nan])  # the NaN is left out: n = 5
    assert empirical_p(value, null, tail) == pytest.approx(expected, abs=1e-15)


def test_empirical_p_refuses_an_unknown_tail():
    with pytest.raises(ValueError, match="tail 'left'; accepted: low, high, two"):
        empirical_p(0.0, np.zeros(3), "left")


@pytest.mark.parametrize("c_hat_a, below", [(3.0, 3), (10.0, 0), (0.5, 5)])
def test_matched_null_p_value_on_known_deltas(c_hat_a, below):
    """Random directions at their matched η (one could not be matched: NaN, left out)."""
    from calibrate.core.random_null import matched_null

    matched = np.stack([_logits(a) for a in RANDOM_A] + [np.full((N, 2), np.nan)])
    scales = np.array([0.5, 0.25, 1.0, 2.0, 4.0, np.nan])
    out = matched_null(_delta(c_hat_a), matched, _logits(A0), scales, LABELS, 15, "guo")
    n = len(RANDOM_A)
    assert (out["n_matched"], out["n_unmatched"]) == (n, 1)
    assert out["p_matched_ece"] == pytest.approx((1 + below) / (1 + n), abs=1e-15)
    assert out["p_matched_ece_two_sided"] == pytest.approx(
        min(1.0, 2 * min(1 + below, 1 + n - below) / (1 + n)), abs=1e-15)
    assert out["p_matched_resolution"] == pytest.approx(1 / (1 + n))
    assert out["matched_delta_ece_median"] == pytest.approx(_delta(4.0), abs=1e-12)
    assert out["matched_scale_median"] == pytest.approx(1.0)
    assert out["matched_delta_accuracy_median"] == 0.0  # every answer stays right


def test_covariance_vectors_are_the_documented_draws():
    """z @ (X − mean) / √(M − 1), z the rows of default_rng(seed).standard_normal((n, M)),
    each row then of unit norm."""
    from calibrate.core.random_null import covariance_vectors

    x = np.random.default_rng(3).normal(size=(7, 5)) * [1.0, 10.0, 0.1, 1.0, 3.0]
    z = np.random.default_rng(11).standard_normal((4, 7))
    draws = z @ (x - x.mean(axis=0)) / np.sqrt(6)
    expected = draws / np.linalg.norm(draws, axis=1, keepdims=True)
    np.testing.assert_allclose(covariance_vectors(x, 4, 11), expected, rtol=1e-12)
    with pytest.raises(ValueError, match=r"need residuals \[M >= 2, H\]"):
        covariance_vectors(x[:1], 4, 11)
