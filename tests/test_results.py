"""Job outputs: atomic writes, JSON of numpy values, exact float64 CSV, the completion marker,
file modes that follow the umask, the output preflight and a full disk as one clear error."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibrate.io import results
from calibrate.io.results import (
    atomic_write,
    read_metrics,
    remove_outputs,
    write_csv,
    write_json,
    write_npz,
    write_text,
)

REPO = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------- file modes (umask)


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    """Run the test under this umask; the old one comes back afterwards."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_result_files_follow_the_umask(tmp_path, umask):
    want = 0o666 & ~umask
    assert want == {0o022: 0o644, 0o002: 0o664}[umask]
    assert results.file_mode() == want and os.umask(umask) == umask  # read, not changed
    paths = [write_text(tmp_path / "a.txt", "x"),
             write_json(tmp_path / results.METRICS_FILE, {"status": "complete"}),
             write_csv(tmp_path / results.LAYERS_FILE, pd.DataFrame({"layer": [0]})),
             write_npz(tmp_path / results.PREDICTIONS_FILE, labels=np.array([0, 1]))]
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == want, (path.name, oct(path.stat().st_mode))
    old = tmp_path / "a.txt"
    old.chmod(0o600)  # a rewrite takes the umask's mode too, not the old file's
    assert stat.S_IMODE(write_text(old, "y").stat().st_mode) == want
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- output preflight, full disk


def _raise(err: OSError):
    def fail(*_a, **_k):
        raise err
    return fail


def test_check_writable_creates_the_folder_and_leaves_nothing(tmp_path):
    job = tmp_path / "outputs" / "day" / "job"
    assert results.check_writable(job) is None
    assert job.is_dir() and list(job.iterdir()) == []


@pytest.mark.parametrize("where, err, reason", [
    ("mkstemp", PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
    ("mkstemp", OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
    ("mkstemp", OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    ("mkdir", PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
])
def test_check_writable_names_folder_and_reason(tmp_path, monkeypatch, where, err, reason):
    job = tmp_path / "job"
    if where == "mkstemp":
        monkeypatch.setattr(results.tempfile, "mkstemp", _raise(err))
    else:
        monkeypatch.setattr(Path, "mkdir", _raise(err))
    with pytest.raises(results.OutputError) as info:
        results.check_writable(job)
    message = str(info.value)
    assert not isinstance(info.value, OSError) and isinstance(info.value, ValueError)
    assert "\n" not in message and str(job) in message and reason in message
    assert message == f"cannot write results to {job}: {reason}"


def test_check_writable_with_a_file_in_the_way(tmp_path):
    (tmp_path / "job").write_text("not a folder")
    prefix = f"cannot write results to {tmp_path / 'job'}: "
    with pytest.raises(results.OutputError, match=re.escape(prefix)):
        results.check_writable(tmp_path / "job")
    assert (tmp_path / "job").read_text() == "not a folder"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
@pytest.mark.parametrize("stage", ["write", "fsync"])
def test_disk_full_is_an_output_error_and_leaves_no_temp(tmp_path, monkeypatch, code, stage):
    target = tmp_path / results.METRICS_FILE
    target.write_text('{"status": "complete", "old": true}')
    full = OSError(code, os.strerror(code))

    def writer(handle):
        handle.write(b'{"status": "comp')
        if stage == "write":
            raise full

    if stage == "fsync":
        monkeypatch.setattr(results.os, "fsync", _raise(full))
    with pytest.raises(results.OutputError) as info:
        atomic_write(target, writer)
    message = str(info.value)
    assert message.startswith(f"disk full while writing {target} ({os.strerror(code)})")
    assert "\n" not in message and not isinstance(info.value, OSError)
    assert info.value.__cause__ is full
    assert target.read_text() == '{"status": "complete", "old": true}'
    assert leftovers(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_disk_full_creating_the_temp_file(tmp_path, monkeypatch):
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(results.tempfile, "mkstemp", _raise(full))
    with pytest.raises(results.OutputError, match="disk full while writing .*layers.csv"):
        write_csv(tmp_path / "layers.csv", pd.DataFrame({"layer": [0]}))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- one job per folder

HOLD = ("import sys, time; from calibrate.io.results import JobLock; "
        "lock = JobLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds ``tmp_path / 'job'`` (returns it once it holds the lock)."""
    started = []

    def start(job: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(job)], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        started.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_held_folder_is_refused_in_one_line_and_left_alone(tmp_path, holder):
    job = tmp_path / "job"
    proc = holder(job)
    before = {p.name: p.read_bytes() for p in job.iterdir()}
    with pytest.raises(results.FolderLocked) as info:
        results.JobLock(job).acquire()
    message = str(info.value)
    assert isinstance(info.value, results.OutputError) and "\n" not in message
    assert message.startswith(f"{job} is in use by another job (pid {proc.pid} on ")
    assert "choose another output folder" in message
    assert {p.name: p.read_bytes() for p in job.iterdir()} == before  # nothing written


def test_the_lock_of_a_killed_job_is_taken_over(tmp_path, holder):
    job = tmp_path / "job"
    proc = holder(job)
    proc.kill()  # SIGKILL: no clean-up, the lock file stays with the dead pid in it
    proc.wait()
    assert (job / results.LOCK_FILE).read_text().split()[0] == str(proc.pid)
    with results.JobLock(job).acquire() as lock:
        assert lock.held
        assert (job / results.LOCK_FILE).read_text().split()[0] == str(os.getpid())
    assert not (job / results.LOCK_FILE).exists()  # released: the file is gone


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / results.LOCK_FILE).write_text(f"{dead_pid()} {socket.gethostname()} 2024-01-01\n")
    lock = results.JobLock(job).acquire()
    assert (job / results.LOCK_FILE).read_text().split()[0] == str(os.getpid())
    lock.release()
    assert list(job.iterdir()) == []


def test_one_holder_at_a_time_in_one_process(tmp_path):
    first = results.JobLock(tmp_path / "job").acquire()
    with pytest.raises(results.FolderLocked, match=f"pid {os.getpid()} "):
        results.JobLock(tmp_path / "job").acquire()
    first.release()
    second = results.JobLock(tmp_path / "job").acquire()  # free again
    assert second.held
    second.release()


@pytest.mark.parametrize("owner, taken", [("live", False), ("dead", True), ("ours", True),
                                          ("ours, held", False)])
def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch, owner, taken):
    """A file system without flock: a live other owner refuses, a dead one is taken over, and
    this process's pid counts only while it holds the lock."""
    job = tmp_path / "job"
    job.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        pid = {"live": live.pid, "dead": dead_pid()}.get(owner, os.getpid())
        (job / results.LOCK_FILE).write_text(f"{pid} {socket.gethostname()} 2024-01-01\n")
        monkeypatch.setattr(results.fcntl, "flock", _raise(OSError(errno.ENOLCK, "No locks")))
        first = results.JobLock(job).acquire() if owner == "ours, held" else None
        if taken:
            lock = results.JobLock(job).acquire()
            assert (job / results.LOCK_FILE).read_text().split()[0] == str(os.getpid())
            lock.release()
        else:
            with pytest.raises(results.FolderLocked, match=re.escape(str(job))):
                results.JobLock(job).acquire()
            assert (job / results.LOCK_FILE).read_text().split()[0] == str(pid)
        if first is not None:
            first.release()
    finally:
        live.kill()
        live.wait()


def test_a_folder_that_cannot_be_made_is_an_output_error(tmp_path):
    (tmp_path / "job").write_text("a file in the way")
    with pytest.raises(results.OutputError, match=re.escape(f"cannot lock {tmp_path / 'job'}: ")):
        results.JobLock(tmp_path / "job").acquire()
