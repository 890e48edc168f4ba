"""Effects of an edit, the matched-effect search and the temperature equivalent, by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from calibrate.core.effects import effect, example_kl, match_scales, temperature_equivalent


def test_kl_and_confidence_effects_by_hand():
    """Two options: p = σ(a). KL(Bern(p) ‖ Bern(q)) = p log(p/q) + (1−p) log((1−p)/(1−q))."""
    base = np.array([[1.0, 0.0], [0.0, 0.0]])
    edited = np.array([[2.0, 0.0], [0.0, 1.0]])
    p, q = expit(np.array([2.0, -1.0])), expit(np.array([1.0, 0.0]))
    kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    np.testing.assert_allclose(example_kl(edited, base), kl, rtol=1e-12)
    assert effect(edited, base, "kl") == pytest.approx(kl.mean(), rel=1e-12)
    top_e, top_b = np.maximum(p, 1 - p), np.maximum(q, 1 - q)
    assert effect(edited, base, "confidence") == pytest.approx(np.abs(top_e - top_b).mean(),
                                                               rel=1e-12)
    with pytest.raises(ValueError, match="effect 'l2'; accepted: kl, confidence"):
        effect(edited, base, "l2")


def test_kl_leaves_out_missing_options_and_is_zero_for_no_change():
    base = np.array([[1.0, 0.5, -np.inf]])
    assert example_kl(base, base)[0] == 0.0
    edited = np.array([[0.5, 1.0, -np.inf]])
    p = np.exp(edited[0, :2]) / np.exp(edited[0, :2]).sum()
    q = np.exp(base[0, :2]) / np.exp(base[0, :2]).sum()
    assert example_kl(edited, base)[0] == pytest.approx(float(np.sum(p * np.log(p / q))))


def test_match_scales_finds_each_root_of_a_known_effect():
    """effect(s) = c_d s² has its root at √(target / c_d): found to the relative tolerance,
    growing (c small) or shrinking (c large) from s = 1; out of [1/F, F]: NaN."""
    c = np.array([1.0, 0.04, 25.0, 1e-8, 1e8, 4.0])
    target = 2.0
    calls = []

    def effect_of(s, rows):
        calls.append(len(rows))
        return c[rows] * s ** 2

    found = match_scales(effect_of, target, len(c), max_factor=1000.0, rel_tol=1e-6)
    expected = np.sqrt(target / c)
    ok = np.array([True, True, True, False, False, True])
    np.testing.assert_allclose(found[ok], expected[ok], rtol=1e-6)
    assert np.isnan(found[~ok]).all()  # √(2e8) and √(2e-8) lie outside [1e-3, 1e3]
    assert calls[0] == len(c)  # the first evaluation is every direction at s = 1
    assert np.isnan(match_scales(effect_of, 0.0, len(c), 1000.0, 1e-6)).all()


def test_match_scales_tolerance_is_relative_in_the_multiple():
    found = match_scales(lambda s, rows: s, 3.0, 1, max_factor=10.0, rel_tol=0.1)
    assert found[0] == pytest.approx(3.0, rel=0.1)
    assert found[0] != pytest.approx(3.0, rel=1e-4)  # a coarse tolerance stops early


def test_temperature_equivalent_recovers_a_pure_temperature_and_reports_what_is_left():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 4)) * 2
    out = temperature_equivalent(base, base / 1.7, (-5.0, 5.0))
    assert out["temperature"] == pytest.approx(1.7, rel=1e-4)
    assert out["residual_kl"] == pytest.approx(0.0, abs=1e-9)
    assert out["kl"] == pytest.approx(float(example_kl(base / 1.7, base).mean()), rel=1e-12)
    shifted = base.copy()
    shifted[:, 0] += 1.0  # a bias, not a temperature: something is left over
    other = temperature_equivalent(base, shifted, (-5.0, 5.0))
    assert other["residual_kl"] > 1e-3
    assert other["residual_kl"] <= other["kl"]
    grid = np.exp(np.linspace(-2, 2, 4001))
    losses = [example_kl(shifted, base / t).mean() for t in grid]
    assert other["temperature"] == pytest.approx(grid[int(np.argmin(losses))], rel=2e-3)
    assert other["residual_kl"] == pytest.approx(min(losses), rel=1e-4)


def test_coordinate_shares_by_hand():
    """ĉ = (0.8, 0, 0.6, 0, 0)·(unit): its top-1 coordinate holds 0.64 of its squared norm;
    coordinate 2 of the residuals is massive (mean |x| 500 against a median of 1) and holds
    0.36; zeroing keeps the rest as it is (no rescaling)."""
    from calibrate.core.effects import coordinate_shares, massive_coordinates

    direction = np.array([0.8, 0.0, 0.6, 0.0, 0.0])
    residuals = np.array([[1.0, -1.0, 500.0, 2.0, 1.0], [-1.0, 1.0, -500.0, 0.0, 1.0]])
    # mean |x| per coordinate: 1, 1, 500, 1, 1 -> median 1
    assert massive_coordinates(residuals, 100.0).tolist() == [2]
    assert massive_coordinates(residuals, 600.0).tolist() == []
    out = coordinate_shares(direction, residuals, top_k=1, ratio=100.0)
    assert out["top_coordinates"] == [0] and out["share_top_k"] == pytest.approx(0.64)
    assert out["massive_coordinates"] == [2] and out["share_massive"] == pytest.approx(0.36)
    assert out["massive_magnitude"] == pytest.approx([500.0])
    np.testing.assert_array_equal(out["without_top_k"], [0.0, 0.0, 0.6, 0.0, 0.0])
    np.testing.assert_array_equal(out["without_massive"], [0.8, 0.0, 0.0, 0.0, 0.0])
    two = coordinate_shares(direction, residuals, top_k=2, ratio=100.0)
    assert two["top_coordinates"] == [0, 2] and two["share_top_k"] == pytest.approx(1.0)


def _reference_log_probs(logits):
    """log_probs and example_kl as first written (numpy's reductions, a temporary per step)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _reference_kl(edited, base, base_log=None):
    log_e = _reference_log_probs(edited)
    log_b = _reference_log_probs(base) if base_log is None else base_log
    p_e = np.exp(log_e)
    present = p_e > 0
    gap = np.where(present, log_e, 0.0) - np.where(present & np.isfinite(log_b), log_b, 0.0)
    return np.where(present, p_e * gap, 0.0).sum(axis=-1)


def test_log_probs_and_kl_equal_the_reference_expressions_bit_for_bit():
    """The in-place, option-sliced computation gives the same float64 values as the plain
    expressions: directions x examples x options, options missing in the base, the edit or
    both, a whole row missing, float32 input, and an edited array broadcast against the base."""
    from calibrate.core.effects import log_probs

    rng = np.random.default_rng(5)
    base = rng.standard_normal((30, 3)) * 4
    edited = base + rng.standard_normal((7, 30, 3)) * 2
    base[2, 1] = edited[:, 2, 1] = -np.inf  # missing in both
    base[4, 2] = -np.inf  # in the edit only
    edited[:, 5, 0] = -np.inf  # in the base only
    edited[1, 6, 0] = 80.0  # p_e of the other options underflows to 0
    cases = [(edited, base), (edited[0], base), (edited.astype(np.float32), base),
             (edited[:, :1], base[:1]), (edited[0, :1], base)]
    for e, b in cases:
        want = _reference_kl(e, b)
        got = example_kl(e, b)
        assert got.shape == want.shape and np.array_equal(got, want)
        got = example_kl(e, b, log_probs(b))
        assert np.array_equal(got, _reference_kl(e, b, _reference_log_probs(b)))
        assert np.array_equal(log_probs(e), _reference_log_probs(e))
    with np.errstate(invalid="ignore"):  # a row with no option at all: NaN in both
        empty = np.full((1, 3), -np.inf)
        assert np.array_equal(log_probs(empty), _reference_log_probs(empty), equal_nan=True)
        assert np.array_equal(example_kl(empty, base[:1]), _reference_kl(empty, base[:1]))
