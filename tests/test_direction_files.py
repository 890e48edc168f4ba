"""Direction files: every vector from outside a fit is checked and normalised, its norm recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from calibrate.core.direction import Direction, DirectionError
from calibrate.directions.files import (
    check_compatible,
    checked_vector,
    load_direction,
    read_direction,
    save_direction,
)

HIDDEN = 6


def _write(path, array, meta=None) -> str:
    save_file({"direction": np.asarray(array, dtype=np.float64)}, str(path),
              metadata={"meta": json.dumps(meta or {})})
    return str(path)


def test_save_then_load_round_trips_vector_and_meta(tmp_path):
    vector = np.array([3.0, 4.0, 0, 0, 0, 0]) / 5.0
    save_direction(Direction(vector, {"method": "layer_diff", "layers": [2, 3]}), tmp_path)
    loaded = load_direction(tmp_path / "direction.safetensors", HIDDEN)
    assert np.array_equal(loaded.vector, vector)
    assert loaded.meta["method"] == "layer_diff" and loaded.meta["layers"] == [2, 3]
    assert loaded.meta["loaded_norm"] == pytest.approx(1.0, abs=1e-15)
    assert json.loads((tmp_path / "direction.json").read_text())["layers"] == [2, 3]


def test_a_vector_of_norm_1000_is_normalised_and_its_norm_recorded(tmp_path):
    """eta = 1 means one unit along the direction, whatever norm the file held."""
    raw = np.zeros(HIDDEN)
    raw[:2] = [600.0, 800.0]  # norm exactly 1000
    loaded = load_direction(_write(tmp_path / "d.safetensors", raw), HIDDEN)
    assert np.array_equal(loaded.vector, np.array([0.6, 0.8, 0, 0, 0, 0]))
    assert loaded.meta["loaded_norm"] == 1000.0


@pytest.mark.parametrize("array, says", [
    (np.zeros(HIDDEN), "is the zero vector"),
    (np.array([1.0, np.nan, 0, 0, 0, 0]), "1 non-finite entries"),
    (np.array([np.inf, 1.0, 0, 0, 0, 0]), "1 non-finite entries"),
    (np.ones((HIDDEN, 2)), "has shape [6, 2]"),
    (np.ones(HIDDEN + 1), "has width 7 but the model's residual width is 6"),
])
def test_bad_direction_files_are_one_clear_error(tmp_path, array, says):
    path = _write(tmp_path / "d.safetensors", array)
    with pytest.raises(DirectionError) as err:
        load_direction(path, HIDDEN)
    message = str(err.value)
    assert message.startswith(f"direction.path={path!r}") and says in message
    assert "accepted:" in message and "\n" not in message


def test_a_file_without_the_direction_tensor_is_refused(tmp_path):
    save_file({"other": np.ones(HIDDEN)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(DirectionError, match=r"holds \['other'\], no 'direction' tensor"):
        read_direction(tmp_path / "d.safetensors")


def test_checked_vector_of_a_caller_array():
    unit, norm = checked_vector([0.0, 0.0, 2.0, 0, 0, 0], HIDDEN, "steer(direction=...)")
    assert np.array_equal(unit, [0, 0, 1.0, 0, 0, 0]) and norm == 2.0
    with pytest.raises(DirectionError, match=r"steer\(direction=\.\.\.\) is the zero vector"):
        checked_vector([0.0] * HIDDEN, HIDDEN, "steer(direction=...)")


def test_another_models_direction_needs_allow_cross_model():
    direction = Direction(np.eye(HIDDEN)[0], {"model": "a", "unembed_hash": "1" * 64})
    with pytest.raises(DirectionError, match="allow_cross_model=true"):
        check_compatible(direction, "2" * 64, "b", allow_cross_model=False)
    flagged = check_compatible(direction, "2" * 64, "b", allow_cross_model=True)
    assert flagged.meta["cross_model_transfer"] is True and flagged.meta["applied_to"] == "b"
    same = check_compatible(Direction(np.eye(HIDDEN)[0], {"unembed_hash": "2" * 64}), "2" * 64,
                            "b", allow_cross_model=False)
    assert "cross_model_transfer" not in same.meta
