"""The calibration direction: the formula on hand-made residuals, files, compatibility, split."""

from __future__ import annotations

import numpy as np
import pytest

from calibrate.core.direction import (
    Direction,
    DirectionError,
    check_layers,
    fit_direction,
    residual_layers_for,
    split_indices,
)
from calibrate.directions.files import (
    check_compatible,
    checked_vector,
    load_direction,
    read_direction,
    save_direction,
)


def hand_residuals():
    # two examples, hidden 2, layers 0..2
    return {
        0: np.array([[0.0, 0.0], [1.0, 1.0]]),
        1: np.array([[3.0, 4.0], [1.0, 3.0]]),   # diffs: (3,4) |5| ; (0,2) |2|
        2: np.array([[3.0, 5.0], [4.0, 3.0]]),   # diffs: (0,1) |1| ; (3,0) |3|
    }


def test_layer_diff_matches_hand_computation():
    # layer 1: mean of (0.6,0.8) and (0,1) = (0.3,0.9); layer 2: mean of (0,1),(1,0) = (0.5,0.5)
    # mean over layers: (0.4, 0.7); unit: (0.4,0.7)/sqrt(0.65)
    d = fit_direction(hand_residuals(), [1, 2], "layer_diff")
    expected = np.array([0.4, 0.7]) / np.sqrt(0.65)
    np.testing.assert_allclose(d.vector, expected, rtol=1e-12)
    assert d.meta["raw_norm"] == pytest.approx(np.sqrt(0.65))
    # cosine between layer directions (0.3,0.9) and (0.5,0.5)
    cos = (0.3 * 0.5 + 0.9 * 0.5) / (np.hypot(0.3, 0.9) * np.hypot(0.5, 0.5))
    assert d.meta["layer_cosines"][0][1] == pytest.approx(cos)


def test_mean_diff_normalizes_after_averaging():
    # raw diffs: layer 1 mean (1.5, 3), layer 2 mean (1.5, 0.5); overall (1.5, 1.75)
    d = fit_direction(hand_residuals(), [1, 2], "mean_diff")
    np.testing.assert_allclose(d.vector, np.array([1.5, 1.75]) / np.hypot(1.5, 1.75), rtol=1e-12)


def test_random_direction_is_seeded_unit():
    a = fit_direction(hand_residuals(), [1], "random", seed=3)
    b = fit_direction(hand_residuals(), [1], "random", seed=3)
    c = fit_direction(hand_residuals(), [1], "random", seed=4)
    np.testing.assert_array_equal(a.vector, b.vector)
    assert not np.allclose(a.vector, c.vector)
    assert np.linalg.norm(a.vector) == pytest.approx(1.0)


def test_unknown_method_and_zero_direction():
    with pytest.raises(DirectionError, match="direction.method='pca'"):
        fit_direction(hand_residuals(), [1], "pca")
    same = {0: np.ones((3, 4)), 1: np.ones((3, 4))}
    with pytest.raises(DirectionError, match="zero"):
        fit_direction(same, [1], "mean_diff")


def test_layer_bookkeeping():
    assert residual_layers_for([28, 29, 30]) == [27, 28, 29, 30]
    assert check_layers([1, 30], 31) == [1, 30]
    with pytest.raises(DirectionError, match=r"1\.\.30"):
        check_layers([0, 31], 31)
    with pytest.raises(DirectionError):
        check_layers([], 31)


def test_round_trip(tmp_path):
    d = fit_direction(hand_residuals(), [1, 2], "layer_diff")
    d.meta.update(model="m", unembed_hash="abc")
    st, js = save_direction(d, tmp_path)
    assert st.name == "direction.safetensors" and js.name == "direction.json"
    stored = read_direction(st)  # unchecked: the file as written
    np.testing.assert_array_equal(stored.vector, d.vector)
    assert stored.meta["model"] == "m" and stored.meta["layers"] == [1, 2]
    loaded = load_direction(st, hidden=2)  # checked against the model's width, normalised
    np.testing.assert_allclose(loaded.vector, d.vector, rtol=1e-12)
    assert loaded.meta["model"] == "m" and loaded.meta["layers"] == [1, 2]
    assert loaded.meta["loaded_norm"] == pytest.approx(1.0)
    assert not list(tmp_path.glob(".*tmp"))


def test_loaded_direction_is_normalised_with_its_norm_recorded(tmp_path):
    save_direction(Direction(np.array([3.0, 4.0]), {"model": "m"}), tmp_path)
    loaded = load_direction(tmp_path / "direction.safetensors", hidden=2)
    np.testing.assert_allclose(loaded.vector, [0.6, 0.8], rtol=1e-12)
    assert loaded.meta["loaded_norm"] == pytest.approx(5.0) and loaded.meta["model"] == "m"
    np.testing.assert_array_equal(read_direction(tmp_path / "direction.json").vector, [3.0, 4.0])


def test_bad_vectors_are_refused_when_loaded(tmp_path):
    for vector, message in ((np.zeros(2), "zero vector"),
                            (np.array([1.0, np.nan]), "non-finite"),
                            (np.ones((2, 2)), r"shape \[2, 2\]")):
        save_direction(Direction(vector, {}), tmp_path)
        with pytest.raises(DirectionError, match=message):
            load_direction(tmp_path / "direction.safetensors", hidden=2)


def test_unreadable_file_is_a_clear_error(tmp_path):
    with pytest.raises(DirectionError, match="no file"):
        load_direction(tmp_path / "missing.safetensors", hidden=2)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DirectionError, match="not a readable direction file"):
        load_direction(bad, hidden=2)


def test_hidden_size_mismatch_and_cross_model_flag():
    d = Direction(np.ones(4) / 2, {"model": "a", "unembed_hash": "h1"})
    # the width is checked by checked_vector (every vector from outside a fit passes it)
    with pytest.raises(DirectionError, match="width 4 but the model's residual width is 8"):
        checked_vector(d.vector, 8, "direction")
    with pytest.raises(DirectionError, match="allow_cross_model"):
        check_compatible(d, "h2", "b", allow_cross_model=False)
    flagged = check_compatible(d, "h2", "b", allow_cross_model=True)
    assert flagged.meta["cross_model_transfer"] is True
    same = check_compatible(Direction(np.ones(4) / 2, {"unembed_hash": "h1"}), "h1", "a", False)
    assert "cross_model_transfer" not in same.meta


@pytest.mark.parametrize("n,fraction", [(10, 0.5), (7, 0.3), (872, 0.5)])
def test_split_never_leaks(n, fraction):
    cal, ev = split_indices(n, fraction, seed=0)
    assert set(cal).isdisjoint(ev)
    assert sorted([*cal, *ev]) == list(range(n))
    again, _ = split_indices(n, fraction, seed=0)
    np.testing.assert_array_equal(cal, again)
    other, _ = split_indices(n, fraction, seed=1)
    assert n < 8 or not np.array_equal(cal, other)


def test_split_rejects_bad_fraction():
    with pytest.raises(DirectionError, match="calibration_fraction=1.0"):
        split_indices(10, 1.0, 0)
    with pytest.raises(DirectionError, match="raise dataset.limit"):
        split_indices(1, 0.5, 0)
