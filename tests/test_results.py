"""Job outputs: atomic writes, JSON of numpy values, exact float64 CSV, the completion marker."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibrate import results
from calibrate.results import (atomic_write, read_metrics, remove_outputs, write_csv, write_json,
                               write_npz, write_text)


def leftovers(folder: Path) -> list[str]:
    """Everything in ``folder`` that is not a finished file (temporary names start with '.')."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


def test_atomic_write_success_leaves_no_temp_file(tmp_path):
    target = tmp_path / "deep" / "er" / "out.bin"
    assert atomic_write(target, lambda h: h.write(b"\x00payload")) == target
    assert target.read_bytes() == b"\x00payload"
    assert leftovers(target.parent) == []


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_atomic_write_failure_keeps_old_content(tmp_path, error):
    target = tmp_path / "metrics.json"
    target.write_text('{"status": "complete", "old": true}')

    def writer(handle):
        handle.write(b'{"status": "comp')  # half a file
        handle.flush()
        assert leftovers(tmp_path), "the partial content goes to a temporary file"
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, writer)
    assert target.read_text() == '{"status": "complete", "old": true}'
    assert leftovers(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_write_failure_creates_nothing(tmp_path):
    target = tmp_path / "layers.csv"

    def writer(handle):
        handle.write(b"layer,ece\n0,0.")
        raise OSError("no space left")

    with pytest.raises(OSError, match="no space"):
        atomic_write(target, writer)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_write_text_replaces_and_is_utf8(tmp_path):
    target = tmp_path / "note.txt"
    write_text(target, "first")
    write_text(target, "η = 4 → ✓")
    assert target.read_bytes() == "η = 4 → ✓".encode()
    assert leftovers(tmp_path) == []


def test_write_json_numpy_values(tmp_path):
    data = {"f32": np.float32(0.25), "f64": np.float64(1 / 3), "i64": np.int64(-7),
            "u8": np.uint8(200), "flag": np.bool_(True), "arr": np.arange(6).reshape(2, 3),
            "farr": np.array([0.5, np.nan]), "path": tmp_path / "x", "nested": {"v": np.int32(3)},
            "nan": float("nan")}
    write_json(tmp_path / "m.json", data)
    back = json.loads((tmp_path / "m.json").read_text())
    assert back["f32"] == 0.25 and back["f64"] == 1 / 3 and back["i64"] == -7 and back["u8"] == 200
    assert back["flag"] is True
    assert back["arr"] == [[0, 1, 2], [3, 4, 5]]
    assert back["farr"][0] == 0.5 and math.isnan(back["farr"][1])
    assert back["path"] == str(tmp_path / "x") and back["nested"] == {"v": 3}
    assert math.isnan(back["nan"])
    assert isinstance(back["i64"], int) and isinstance(back["f64"], float)


def test_write_json_unserializable_leaves_no_file(tmp_path):
    with pytest.raises(TypeError, match="object"):
        write_json(tmp_path / "m.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_write_csv_round_trips_float64_exactly(tmp_path):
    values = np.array([0.1, 1 / 3, math.pi * 1e20, np.nextafter(1.0, 2.0), 1e-300, 5e-324,
                       -2.5e-17, 0.0, 123456789.123456789, np.nan, np.inf])
    rng = np.random.default_rng(0)
    spread = rng.random(len(values)) * 10.0 ** rng.integers(-12, 12, len(values))
    table = pd.DataFrame({"layer": np.arange(len(values)), "value": values, "random": spread,
                          "name": [f"l{i}" for i in range(len(values))]})
    write_csv(tmp_path / "layers.csv", table)
    back = pd.read_csv(tmp_path / "layers.csv", float_precision="round_trip")
    assert list(back.columns) == ["layer", "value", "random", "name"]  # no index column
    assert back["layer"].tolist() == list(range(len(values)))
    for column in ("value", "random"):
        got, want = back[column].to_numpy(), table[column].to_numpy()
        assert np.array_equal(got, want, equal_nan=True), column
        assert got.tobytes() == want.tobytes()  # bit for bit
    assert leftovers(tmp_path) == []


def test_write_npz_round_trips(tmp_path):
    probs = np.random.default_rng(1).random((3, 4, 2))
    write_npz(tmp_path / "predictions.npz", probs=probs, labels=np.array([0, 1, 1]))
    with np.load(tmp_path / "predictions.npz") as npz:
        assert np.array_equal(npz["probs"], probs) and npz["labels"].tolist() == [0, 1, 1]
    assert leftovers(tmp_path) == []


def test_read_metrics_complete(tmp_path):
    write_json(tmp_path / results.METRICS_FILE, {"status": "complete", "ece": np.float64(0.1)})
    assert read_metrics(tmp_path) == {"status": "complete", "ece": 0.1}


@pytest.mark.parametrize("content", [
    None,                                    # missing
    b'{"status": "complete", "ece": 0.',     # truncated
    b"",                                     # empty
    b"\xff\xfe\x00garbage",                  # not UTF-8
    b"[1, 2, 3]",                            # JSON, but not an object
    b'"complete"',                           # JSON string
    b'{"status": "running"}',                # not finished
    b'{"status": "failed", "error": "x"}',
    b'{"ece": 0.1}',                         # no status
])
def test_read_metrics_none_unless_complete(tmp_path, content):
    if content is not None:
        (tmp_path / results.METRICS_FILE).write_bytes(content)
    assert read_metrics(tmp_path) is None


def test_read_metrics_directory_instead_of_file(tmp_path):
    (tmp_path / results.METRICS_FILE).mkdir()
    assert read_metrics(tmp_path) is None
    assert read_metrics(tmp_path / "missing-job") is None


def test_remove_outputs(tmp_path):
    for name in ("layers.csv", "predictions.npz", "keep.txt"):
        (tmp_path / name).write_text("x")
    remove_outputs(tmp_path, ["layers.csv", "predictions.npz", "metrics.json"])  # missing is fine
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
