"""Fitted lenses on disk: complete folders only, one per key; a cache that cannot be written is
reported and skipped."""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest
import torch
from conftest import build_tiny

from calibrate.model.load import wrap_model
from calibrate.readouts import lens_cache


@pytest.fixture(scope="module")
def loaded():
    return wrap_model(build_tiny("llama", 40), None, name="tiny")


def test_the_key_hashes_the_weights_the_text_and_the_settings(loaded):
    other = wrap_model(build_tiny("llama", 40, seed=1), None, name="tiny")
    same_weights_other_type = wrap_model(build_tiny("mistral", 40), None, name="tiny")
    key = lens_cache.fit_key("tuned", loaded, "text", {"steps": 1})
    assert key == lens_cache.fit_key("tuned", loaded, "text", {"steps": 1})
    assert len({key, lens_cache.fit_key("affine", loaded, "text", {"steps": 1}),
                lens_cache.fit_key("tuned", other, "text", {"steps": 1}),
                lens_cache.fit_key("tuned", same_weights_other_type, "text", {"steps": 1}),
                lens_cache.fit_key("tuned", loaded, "other text", {"steps": 1}),
                lens_cache.fit_key("tuned", loaded, "text", {"steps": 2})}) == 6


def test_a_stored_fit_loads_and_an_incomplete_one_does_not(tmp_path):
    assert lens_cache.load("tuned", "k1", tmp_path) is None
    folder = lens_cache.store("tuned", "k1", tmp_path, {"summary": {"a": 1}},
                              lambda tmp: torch.save({"x": torch.ones(2)}, tmp / "params.pt"))
    assert folder == tmp_path / "lenses" / "tuned" / "k1"
    path, record = lens_cache.load("tuned", "k1", tmp_path)
    assert path == folder and record == {"summary": {"a": 1}, "key": "k1"}
    assert torch.equal(torch.load(path / "params.pt", weights_only=True)["x"], torch.ones(2))
    assert [p.name for p in folder.parent.iterdir()] == ["k1"]  # no temporary folder left
    # a folder without its record, or with another key's, is not a fit
    broken = tmp_path / "lenses" / "tuned" / "k2"
    broken.mkdir()
    assert lens_cache.load("tuned", "k2", tmp_path) is None
    (broken / lens_cache.FIT_FILE).write_text(json.dumps({"key": "k1"}))
    assert lens_cache.load("tuned", "k2", tmp_path) is None


def test_a_failing_write_leaves_nothing(tmp_path):
    def fail(tmp):
        (tmp / "params.pt").write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        lens_cache.store("tuned", "k3", tmp_path, {}, fail)
    assert list((tmp_path / "lenses" / "tuned").iterdir()) == []
    assert lens_cache.load("tuned", "k3", tmp_path) is None


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.ENOSPC])
def test_an_unwritable_cache_is_reported_and_skipped(tmp_path, caplog, monkeypatch, code):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(lens_cache.tempfile, "mkdtemp", refuse)
    with caplog.at_level(logging.WARNING, logger="calibrate"):
        assert lens_cache.store("tuned", "k4", tmp_path / f"c{code}", {}, lambda tmp: None) is None
    assert "is not writable" in caplog.text


def test_other_errors_are_raised(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(lens_cache.tempfile, "mkdtemp", broken)
    with pytest.raises(OSError, match="I/O error"):
        lens_cache.store("tuned", "k5", tmp_path, {}, lambda tmp: None)
