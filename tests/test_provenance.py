"""The code identity names this checkout's commit and the installed library versions."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import calibrate
from calibrate.io import provenance


def test_code_identity_is_this_checkout():
    ident = provenance.code_identity()
    root = Path(calibrate.__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert ident["git_commit"] == head.stdout.strip()
    assert isinstance(ident["git_dirty"], bool)
    assert ident["calibrate"] == calibrate.__version__
    import torch
    import transformers
    assert (ident["torch"], ident["transformers"]) == (torch.__version__, transformers.__version__)


def test_outside_git_the_commit_is_none(monkeypatch):
    monkeypatch.setattr(provenance, "_git", lambda args, cwd: None)
    provenance.code_identity.cache_clear()
    try:
        ident = provenance.code_identity()
        assert ident["git_commit"] is None and ident["git_dirty"] is None
    finally:
        provenance.code_identity.cache_clear()
