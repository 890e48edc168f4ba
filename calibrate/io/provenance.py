"""What code produced a result: calibrate's version, its git commit (and whether the checkout
had uncommitted changes), and the versions of the libraries the numbers depend on."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "transformers", "numpy")


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def code_identity() -> dict[str, Any]:
    """calibrate's version, git commit and dirty flag (None outside a git checkout), and the
    library versions; recorded in every metrics.json."""
    root = Path(__file__).resolve().parents[1]  # the calibrate package
    commit = _git(["rev-parse", "HEAD"], root)
    status = _git(["status", "--porcelain", "--untracked-files=no", "--", "."], root) \
        if commit else None
    return {"calibrate": _version("calibrate"), "git_commit": commit,
            "git_dirty": None if status is None else bool(status),
            **{name: _version(name) for name in LIBRARIES}}
