"""The option-axis reductions: numpy's and scipy's values, bit for bit, by slices of the options."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax

from calibrate.core.option_scores import (
    SLICED_OPTIONS,
    option_argmax,
    option_log_softmax,
    option_max,
    option_probabilities,
    option_sum,
)


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal shapes, dtypes and values, NaN where NaN, and the same sign on every zero."""
    got, want = np.asarray(got), np.asarray(want)
    return (got.shape == want.shape and got.dtype == want.dtype
            and np.array_equal(got, want, equal_nan=True)
            and np.array_equal(np.signbit(got), np.signbit(want)))


def cases(seed: int = 0, n: int = 400):
    """Arrays [..., K] with K from 1 to past :data:`SLICED_OPTIONS`, scales from 1e-8 to 1e8,
    -inf slots, a few NaN, +inf and -0.0, some not contiguous in the option axis."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        k = int(rng.integers(1, SLICED_OPTIONS + 4))
        lead = tuple(int(v) for v in rng.integers(1, 12, size=int(rng.integers(0, 4))))
        x = rng.standard_normal(lead + (k,)) * 10.0 ** rng.uniform(-8, 8)
        for value, share in ((-np.inf, 0.2), (np.nan, 0.02), (np.inf, 0.02), (-0.0, 0.1)):
            if rng.random() < 0.3:
                x[rng.random(x.shape) < share] = value
        if rng.random() < 0.3 and x.ndim >= 2:
            x = np.swapaxes(np.ascontiguousarray(np.swapaxes(x, 0, -1)), 0, -1)
        yield x


def test_option_max_and_sum_are_numpys_reductions_bit_for_bit():
    with np.errstate(all="ignore"):
        for x in cases():
            assert same_bits(option_max(x), x.max(axis=-1))
            assert same_bits(option_sum(x), x.sum(axis=-1))
            positive = np.exp(x)  # the sums the softmaxes take
            assert same_bits(option_sum(positive), positive.sum(axis=-1))


def test_option_sum_by_hand_adds_in_order_from_zero():
    """(0 + 1e16) + 1 + (-1e16) is 0 in float64 (1 is lost), in numpy's order and in ours;
    two negative zeros sum to +0.0 as numpy's reduction from 0 gives."""
    x = np.array([[1e16, 1.0, -1e16], [-0.0, -0.0, -0.0]])
    assert same_bits(option_sum(x), np.array([0.0, 0.0]))
    assert same_bits(option_sum(x), x.sum(axis=-1))
    assert same_bits(option_max(np.array([[1.0, np.nan, 3.0]])), np.array([np.nan]))


def test_past_the_sliced_size_and_other_dtypes_numpy_reduces():
    wide = np.random.default_rng(1).standard_normal((3, SLICED_OPTIONS + 5))
    assert same_bits(option_sum(wide), wide.sum(axis=-1))
    assert same_bits(option_max(wide), wide.max(axis=-1))
    single = np.arange(6, dtype=np.float32).reshape(3, 2) / 7
    assert same_bits(option_sum(single), single.sum(axis=-1))  # float32: numpy's own sum
    assert same_bits(option_max(single), single.max(axis=-1))


def test_option_log_softmax_is_scipys_bit_for_bit():
    with np.errstate(all="ignore"):
        for x in cases(seed=2):
            assert same_bits(option_log_softmax(x), log_softmax(x, axis=-1))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_option_probabilities_are_the_plain_softmax_expression_bit_for_bit(k):
    rng = np.random.default_rng(k)
    logits = (rng.standard_normal((40, 7, k)) * 8).astype(np.float32)
    logits[3, :, -1] = -np.inf
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    assert same_bits(option_probabilities(logits), e / e.sum(axis=-1, keepdims=True))


def test_option_argmax_is_numpys_first_largest_or_first_nan():
    with np.errstate(all="ignore"):
        for x in cases(seed=3):
            got, want = option_argmax(x), x.argmax(axis=-1)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert np.array_equal(got, want)
    ties = np.array([[1.0, 3.0, 3.0], [np.nan, 5.0, np.nan], [2.0, np.nan, 9.0],
                     [-np.inf, -np.inf, -np.inf], [0.0, -0.0, 0.0]])
    assert option_argmax(ties).tolist() == [1, 0, 1, 0, 0] == ties.argmax(axis=-1).tolist()
    assert np.array_equal(option_argmax(np.arange(6).reshape(3, 2)), [1, 1, 1])  # integers
