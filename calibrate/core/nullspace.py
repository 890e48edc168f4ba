"""The effective null space of the unembedding, and how aligned a direction is with it.

Prior work (Stolfo et al. 2024, "Confidence regulation neurons") found that models regulate
confidence by writing into the bottom singular directions of the unembedding; the paper checks
that the calibration direction ĉ is *not* aligned with them. This module is the pure maths.

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

LayerNorm centring (Phi-2, GPT-2, as opposed to RMSNorm in Llama/Mistral/SmolLM2): LayerNorm
subtracts the per-token mean before scaling, so the centred vector has no component along the
all-ones direction 1, and a residual-stream component along 1 is invisible to the logits
whatever W_U is. Such a direction is a null direction of the *model*, not necessarily of W_U,
so the bottom singular vectors of W_U may or may not contain it;
``ones_direction_alignment`` reports how much of 1/√hidden lies in a given basis. RMSNorm does
not centre, so for those models 1 is not special.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from calibrate.io import results

DEFAULT_CHUNK_ROWS = 8192
DEFAULT_FRACTION = 0.01
CACHE_SUBDIR = "nullspace"
CACHE_FORMAT_VERSION = "1"
_EIGVECS_KEY = "eigenvectors"
_EIGVALS_KEY = "eigenvalues"
_OS_ERROR = re.compile(r"os error (\d+)")


# --- choosing k --------------------------------------------------------------------------------


def resolve_k(hidden: int, k: int | None = None, fraction: float | None = DEFAULT_FRACTION) -> int:
    """Size of the null space: ``k`` if given, else ``max(1, round(fraction * hidden))``.

    Raises:
        ValueError: if ``hidden < 1``, ``k`` is outside ``[0, hidden]`` or ``fraction`` outside
            ``(0, 1]`` (or both ``k`` and ``fraction`` are None).
    """
    if hidden < 1:
        raise ValueError(f"hidden must be >= 1, got {hidden}")
    if k is not None:
        if not 0 <= k <= hidden:
            raise ValueError(f"k must be in [0, hidden={hidden}], got {k}")
        return int(k)
    if fraction is None:
        raise ValueError("either k or fraction must be given, got k=None and fraction=None")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, round(fraction * hidden))


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


# --- projection and ablation -------------------------------------------------------------------


def _check_basis(basis: torch.Tensor) -> None:
    if basis.ndim != 2 or basis.shape[1] > basis.shape[0]:
        raise ValueError(f"basis must be [hidden, k] with k <= hidden, got {tuple(basis.shape)}")


def projector_complement(basis: torch.Tensor) -> torch.Tensor:
    """``P = I - U Uᵀ``, the orthogonal projector onto the complement of span(U)."""
    _check_basis(basis)
    eye = torch.eye(basis.shape[0], dtype=basis.dtype, device=basis.device)
    return eye - basis @ basis.T


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 only when the caller already pays for it; activations can be large.
    return torch.float64 if dtype == torch.float64 else torch.float32


def truncate(
    residual: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None = None
) -> torch.Tensor:
    """Ablate the span(U) component of ``residual`` (shape ``[..., hidden]``).

    Zero ablation: ``r - (r U) Uᵀ``. Mean ablation (``mean`` a ``[hidden]`` vector): the span
    component is replaced by that of ``mean``, ``r - (r U) Uᵀ + (mean U) Uᵀ``. Returns the
    residual's dtype and device.
    """
    _check_basis(basis)
    hidden = basis.shape[0]
    if residual.shape[-1] != hidden:
        raise ValueError(f"residual last dim {residual.shape[-1]} != basis hidden {hidden}")
    dtype = _compute_dtype(residual.dtype)
    u = basis.to(device=residual.device, dtype=dtype)
    r = residual.to(dtype)
    coefficients = r @ u
    if mean is not None:
        if mean.shape != (hidden,):
            raise ValueError(f"mean must have shape ({hidden},), got {tuple(mean.shape)}")
        coefficients = coefficients - mean.to(device=residual.device, dtype=dtype) @ u
    return (r - coefficients @ u.T).to(residual.dtype)


# --- alignment ---------------------------------------------------------------------------------


def _as_vector(v: torch.Tensor, hidden: int) -> torch.Tensor:
    vector = v.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    if vector.shape[0] != hidden:
        raise ValueError(f"vector has {vector.shape[0]} entries, basis hidden is {hidden}")
    if not torch.isfinite(vector).all() or vector.norm() == 0:
        raise ValueError("vector must be finite and non-zero")
    return vector


def _basis64(basis: torch.Tensor) -> torch.Tensor:
    _check_basis(basis)
    return basis.detach().to(device="cpu", dtype=torch.float64)


def alignment(v: torch.Tensor, basis: torch.Tensor) -> float:
    """``ρ(v) = ‖U_kᵀ v‖ / ‖v‖``: 1 inside span(U), 0 orthogonal to it (U orthonormal)."""
    u = _basis64(basis)
    vector = _as_vector(v, u.shape[0])
    return float((u.T @ vector).norm() / vector.norm())


def max_cosine(v: torch.Tensor, basis: torch.Tensor) -> float:
    """Largest ``|cos|`` between ``v`` and a single basis column (0 for an empty basis)."""
    u = _basis64(basis)
    vector = _as_vector(v, u.shape[0])
    if u.shape[1] == 0:
        return 0.0
    cosines = (u.T @ vector) / (u.norm(dim=0) * vector.norm())
    return float(cosines.abs().max())


def ones_direction_alignment(basis: torch.Tensor) -> float:
    """ρ of the normalized all-ones vector: how much of LayerNorm's invisible direction is in U."""
    hidden = basis.shape[0]
    return alignment(torch.ones(hidden, dtype=torch.float64) / math.sqrt(hidden), basis)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def random_unit_vectors(n: int, hidden: int, seed: int) -> torch.Tensor:
    """``n`` directions uniform on the sphere in ``hidden`` dimensions, float64 ``[n, hidden]``."""
    if n < 0 or hidden < 1:
        raise ValueError(f"need n >= 0 and hidden >= 1, got n={n}, hidden={hidden}")
    gaussian = torch.randn(n, hidden, dtype=torch.float64, generator=_generator(seed))
    return gaussian / gaussian.norm(dim=1, keepdim=True)


def random_subspace(hidden: int, k: int, seed: int) -> torch.Tensor:
    """A uniformly random ``k``-dimensional subspace: orthonormal float64 ``[hidden, k]``."""
    resolve_k(hidden, k)
    gaussian = torch.randn(hidden, k, dtype=torch.float64, generator=_generator(seed))
    q, r = torch.linalg.qr(gaussian)
    # Fixing the signs of diag(R) makes Q Haar-distributed rather than biased by the QR routine.
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)


def _random_rhos(basis: torch.Tensor, n_random: int, seed: int) -> torch.Tensor:
    vectors = random_unit_vectors(n_random, basis.shape[0], seed)
    return (vectors @ basis).norm(dim=1)


def alignment_report(
    direction: torch.Tensor,
    basis: torch.Tensor,
    layer_directions: Mapping[int, torch.Tensor] | None = None,
    n_random: int = 1000,
    seed: int = 0,
) -> dict:
    """ρ of ``direction`` against span(U), with a random-direction baseline.

    ``p_value`` is empirical: ``(1 + #random with ρ >= ρ(direction)) / (1 + n_random)``, small
    when the direction is more aligned than chance. ``rho_per_layer`` holds ρ of each per-layer
    direction c_i.
    """
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    u = _basis64(basis)
    hidden, k = u.shape
    rho = alignment(direction, u)
    random_rhos = _random_rhos(u, n_random, seed)
    return {
        "k": k,
        "hidden": hidden,
        "rho": rho,
        "rho_baseline": math.sqrt(k / hidden),
        "rho_random_mean": float(random_rhos.mean()),
        "rho_random_std": float(random_rhos.std()) if n_random > 1 else 0.0,
        "p_value": (1 + int((random_rhos >= rho).sum())) / (1 + n_random),
        "max_cosine": max_cosine(direction, u),
        "rho_per_layer": {
            int(layer): alignment(vector, u) for layer, vector in (layer_directions or {}).items()
        },
    }


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
