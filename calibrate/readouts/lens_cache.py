"""Fitted lenses on disk: ``<cache>/lenses/<kind>/<key>/``, one folder per identity.

The key hashes what decides the fit (the model's weights fingerprint and dtype, the training
text's token ids, the settings), so a sweep over η, datasets of the same split or studies fits a
lens once. A folder is complete when its ``fit.json`` (the fit's record, written last) is there;
it is written under a temporary name and renamed into place, so a killed fit leaves nothing a
later job would read. A cache that cannot be written is reported once and the job goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from calibrate.io import results
from calibrate.model.assets import cache_root
from calibrate.model.load import LoadedModel

FIT_FILE = "fit.json"
CACHE_VERSION = 1


def fit_key(kind: str, loaded: LoadedModel, text_digest: str, settings: dict[str, Any]) -> str:
    """sha256 of what decides a fit: the kind, the weights as loaded, the text, the settings."""
    ident = loaded.identity()
    payload = {"version": CACHE_VERSION, "kind": kind, "weights": ident["fingerprint"],
               "model_type": ident["model_type"],
               "dtype": ident["dtype"], "text": text_digest, "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def folder(kind: str, key: str, cache_dir: str | Path | None) -> Path:
    return cache_root(cache_dir) / "lenses" / kind / key


def load(kind: str, key: str, cache_dir: str | Path | None) -> tuple[Path, dict[str, Any]] | None:
    """(folder, fit record) of a complete cached fit, or None."""
    path = folder(kind, key, cache_dir)
    try:
        record = json.loads((path / FIT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return (path, record) if isinstance(record, dict) and record.get("key") == key else None


def store(kind: str, key: str, cache_dir: str | Path | None, record: dict[str, Any],
          write: Callable[[Path], None]) -> Path | None:
    """Write a fit: ``write(tmp_folder)`` then the record, renamed into place; None when the
    cache cannot be written (reported once)."""
    target = folder(kind, key, cache_dir)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key[:12]}.", suffix=".tmp"))
        try:
            write(tmp)
            results.write_json(tmp / FIT_FILE, {**record, "key": key})
            if target.exists():  # another process fitted it meanwhile: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except (OSError, results.OutputError) as err:
        if not results.cache_unwritable(err):
            raise
        results.warn_cache_unwritable(target.parent, err)
        return None
    return target
