"""The effective null space of the unembedding: its basis and the basis's on-disk cache.

Prior work (Stolfo et al. 2024, "Confidence regulation neurons") found that models regulate
confidence by writing into the bottom singular directions of the unembedding; the paper checks
that the calibration direction ĉ is *not* aligned with them. This module finds that basis;
:mod:`calibrate.core.subspace` measures a direction against it (alignment ρ, random baselines,
LayerNorm's all-ones direction) and projects it out (``truncate``). Those functions and
``resolve_k`` are re-exported here, so ``nullspace.<name>`` keeps reaching them.

Conventions:

* ``weight`` is the unembedding as Hugging Face stores it, ``lm_head.weight`` of shape
  ``[vocab, hidden]``, exactly as loaded. It is *not* centred or LayerNorm-folded the way
  TransformerLens rewrites it by default, so the basis here is that of the model's own W_U and
  differs from a TransformerLens null space. An ``lm_head`` bias (Phi-2) only shifts logits by a
  constant and plays no part.
* The null space ``U_k`` is the ``k`` left singular vectors of ``M = W_Uᵀ`` (hidden × vocab)
  with the smallest singular values. They are the bottom eigenvectors of the hidden × hidden
  Gram matrix ``G = W_Uᵀ W_U``, accumulated in float64 over row chunks, which is far cheaper
  than an SVD of hidden × vocab. Squaring the matrix squares its condition number; float64
  keeps the eigenvectors accurate for weights stored in bf16/fp16/fp32.
* The basis lives in the coordinates W_U reads, i.e. the output of the final norm. A residual
  direction v reaches W_U as ``γ ⊙ v / σ`` (centred first for LayerNorm), so ρ(v) measured here
  ignores the per-channel gain γ; pass ``weight * γ`` to study the gain-folded matrix instead.
* Every returned basis and spectrum is float64 on the CPU. Eigenvector signs are fixed (largest
  absolute entry positive) so results are reproducible across runs and the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from calibrate.core.subspace import (  # noqa: F401 - re-exported: nullspace.<name> stays valid
    DEFAULT_FRACTION,
    alignment,
    alignment_report,
    max_cosine,
    ones_direction_alignment,
    projector_complement,
    random_subspace,
    random_unit_vectors,
    resolve_k,
    truncate,
)
from calibrate.io import results

DEFAULT_CHUNK_ROWS = 8192
CACHE_SUBDIR = "nullspace"
CACHE_FORMAT_VERSION = "1"
_EIGVECS_KEY = "eigenvectors"
_EIGVALS_KEY = "eigenvalues"
_OS_ERROR = re.compile(r"os error (\d+)")


# --- the decomposition -------------------------------------------------------------------------


def _check_weight(weight: torch.Tensor) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be [vocab, hidden], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")


def gram_matrix(weight: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """``W_Uᵀ W_U`` as a float64 ``[hidden, hidden]`` matrix on the weight's device.

    Rows are upcast ``chunk_rows`` at a time, so a 128k × 4096 bf16 matrix never needs a full
    float64 copy (one chunk of 8192 rows is 256 MiB).
    """
    _check_weight(weight)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    hidden = weight.shape[1]
    gram = torch.zeros(hidden, hidden, dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], chunk_rows):
        chunk = weight[start : start + chunk_rows].detach().to(torch.float64)
        gram.addmm_(chunk.T, chunk)
    # Summation order makes G asymmetric by rounding; eigh only reads one triangle.
    return (gram + gram.T) / 2


def _canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive."""
    if vectors.shape[1] == 0:
        return vectors
    rows = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[rows, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def eigendecomposition(
    weight: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenpairs of ``W_Uᵀ W_U``: (eigenvalues ascending ``[hidden]``, eigenvectors
    ``[hidden, hidden]`` as columns), float64 on the CPU, signs canonical."""
    # eigh on the CPU so the basis does not depend on where the weights live.
    eigenvalues, eigenvectors = torch.linalg.eigh(gram_matrix(weight, chunk_rows).cpu())
    return eigenvalues, _canonical_signs(eigenvectors)


def _bottom_k(
    eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` eigenvectors and the matching singular values (rounding clamped at 0)."""
    resolve_k(eigenvectors.shape[0], k)
    singular_values = eigenvalues[:k].clamp(min=0.0).sqrt()
    return eigenvectors[:, :k].contiguous(), singular_values.contiguous()


def null_space(
    weight: torch.Tensor, k: int, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bottom-``k`` left singular vectors of ``W_Uᵀ``.

    Returns:
        ``(U_k, sigma)``: ``U_k`` float64 ``[hidden, k]`` with orthonormal columns, ``sigma`` the
        ``k`` smallest singular values in ascending order.
    """
    _check_weight(weight)
    resolve_k(weight.shape[1], k)
    return _bottom_k(*eigendecomposition(weight, chunk_rows), k)


# --- cache -------------------------------------------------------------------------------------


def weights_hash(weight: torch.Tensor) -> str:
    """sha256 hex of the tensor's raw bytes (any dtype; dtype and shape are not part of it)."""
    flat = weight.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256()
    digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


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
    weight: torch.Tensor, k: int, cache_dir: Path, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``null_space`` served from ``cache_dir/nullspace/<weights sha256>.safetensors``.

    The entry stores the full eigendecomposition (hidden² float64: 128 MiB at hidden 4096), so
    one entry serves every k. An entry that is unreadable or whose metadata (hash, shape,
    dtype) does not match is recomputed and atomically rewritten. A cache that cannot be written
    (permission denied, read-only, disk full, quota) is logged once per process on the
    ``calibrate`` logger and the result is returned uncached.
    """
    _check_weight(weight)
    hidden = weight.shape[1]
    resolve_k(hidden, k)
    digest = weights_hash(weight)
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
    return _bottom_k(*entry, k)
