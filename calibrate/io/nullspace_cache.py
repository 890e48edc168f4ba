"""The on-disk cache of the unembedding's eigendecomposition (:mod:`calibrate.core.nullspace`).

One entry per unembedding: ``<cache>/nullspace/<weights sha256>.safetensors`` holds the full
eigendecomposition of the hidden × hidden Gram matrix (float64), so one entry serves every k.
An entry that is unreadable or whose metadata (hash, shape, dtype) does not match is recomputed
and atomically rewritten; a cache that cannot be written is warned about once and skipped.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from calibrate.core.nullspace import (
    DEFAULT_CHUNK_ROWS,
    bottom_k,
    check_weight,
    eigendecomposition,
    resolve_k,
    weights_hash,
)
from calibrate.io import results

CACHE_SUBDIR = "nullspace"
CACHE_FORMAT_VERSION = "1"
_EIGVECS_KEY = "eigenvectors"
_EIGVALS_KEY = "eigenvalues"
_OS_ERROR = re.compile(r"os error (\d+)")


def _cache_path(cache_dir: Path, digest: str) -> Path:
    return Path(cache_dir) / CACHE_SUBDIR / f"{digest}.safetensors"


def _metadata(weight: torch.Tensor, digest: str) -> dict[str, str]:
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "weights_sha256": digest,
        "shape": json.dumps(list(weight.shape)),
        "dtype": str(weight.dtype),
    }


def _load_entry(
    path: Path, expected: dict[str, str], hidden: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (eigenvalues, eigenvectors), or None if missing, unreadable or stale."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if handle.metadata() != expected:
                return None
            eigenvalues = handle.get_tensor(_EIGVALS_KEY)
            eigenvectors = handle.get_tensor(_EIGVECS_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError):
        return None
    shapes_ok = eigenvalues.shape == (hidden,) and eigenvectors.shape == (hidden, hidden)
    if not shapes_ok or eigenvectors.dtype != torch.float64:
        return None
    return eigenvalues, eigenvectors


def _save_entry(
    path: Path, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, metadata: dict[str, str]
) -> None:
    """Write to a temporary file beside ``path`` and rename it into place (mode 0o666 & ~umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        tensors = {_EIGVALS_KEY: eigenvalues.contiguous(), _EIGVECS_KEY: eigenvectors.contiguous()}
        try:
            save_file(tensors, tmp_name, metadata=metadata)
        except SafetensorError as err:  # an I/O error there carries only "(os error N)"
            found = _OS_ERROR.search(str(err))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), tmp_name) from err
        try:
            os.chmod(tmp_name, results.file_mode())
        except OSError:
            pass  # best effort: some mounts refuse chmod
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)


def cached_null_space(
    weight: torch.Tensor, k: int, cache_dir: Path, chunk_rows: int = DEFAULT_CHUNK_ROWS,
    digest: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``null_space`` served from ``cache_dir/nullspace/<weights sha256>.safetensors``.

    The entry stores the full eigendecomposition (hidden² float64: 128 MiB at hidden 4096), so
    one entry serves every k. An entry that is unreadable or whose metadata (hash, shape,
    dtype) does not match is recomputed and atomically rewritten. A cache that cannot be written
    (permission denied, read-only, disk full, quota) is logged once per process on the
    ``calibrate`` logger and the result is returned uncached. ``digest``: the weights' sha256
    when already known (a loaded model's ``unembed_hash``, the same bytes' hash), so a job does
    not hash the unembedding again.
    """
    check_weight(weight)
    hidden = weight.shape[1]
    resolve_k(hidden, k)
    digest = weights_hash(weight) if digest is None else digest
    path = _cache_path(cache_dir, digest)
    metadata = _metadata(weight, digest)
    entry = _load_entry(path, metadata, hidden)
    if entry is None:
        entry = eigendecomposition(weight, chunk_rows)
        try:
            _save_entry(path, *entry, metadata)
        except OSError as err:
            if not results.cache_unwritable(err):
                raise
            results.warn_cache_unwritable(path.parent, err)
    return bottom_k(*entry, k)
