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
  TransformerLens's compatibility mode (and its former HookedTransformer) rewrites it, so the
  basis here is that of the model's own W_U and differs from such a null space. An ``lm_head`` bias (Phi-2) only shifts logits by a
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
from dataclasses import dataclass

import torch

from calibrate import values
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
from calibrate.errors import ConfigError

DEFAULT_CHUNK_ROWS = 8192


@dataclass
class NullspaceSettings:
    """The ``nullspace`` group: k (or its fraction of hidden) and the random baselines."""

    k: int | None = None  # bottom singular directions; None: round(fraction * hidden)
    fraction: float = 0.01
    n_random: int = 1000  # random unit vectors of the alignment baseline and p-value
    seed: int = 0
    n_control: int = 32  # random k-subspaces the truncation is compared with (0: none)

    def __post_init__(self) -> None:
        values.optional_integer("nullspace.k", self.k, 0)
        values.number("nullspace.fraction", self.fraction, lambda f: 0 < f <= 1,
                      "a number in (0, 1]")
        values.integer("nullspace.n_random", self.n_random, 1)
        values.integer("nullspace.seed", self.seed, 0)
        values.integer("nullspace.n_control", self.n_control, 0)

    def k_for(self, hidden: int) -> int:
        """k for a model of width ``hidden``: ``k``, else ``max(1, round(fraction * hidden))``."""
        return resolve_k(hidden, self.k, self.fraction)

    def check_shape(self, hidden: int) -> None:
        """k must fit the model's width (before any weight is read)."""
        if self.k is not None and self.k > hidden:
            raise ConfigError(f"nullspace.k={self.k}; accepted: 0..{hidden} (the hidden size)")


# --- the decomposition -------------------------------------------------------------------------


def check_weight(weight: torch.Tensor) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be [vocab, hidden], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")


def gram_matrix(weight: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """``W_Uᵀ W_U`` as a float64 ``[hidden, hidden]`` matrix on the weight's device.

    Rows are upcast ``chunk_rows`` at a time, so a 128k × 4096 bf16 matrix never needs a full
    float64 copy (one chunk of 8192 rows is 256 MiB).
    """
    check_weight(weight)
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


def bottom_k(
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
    check_weight(weight)
    resolve_k(weight.shape[1], k)
    return bottom_k(*eigendecomposition(weight, chunk_rows), k)


# --- cache -------------------------------------------------------------------------------------


def weights_hash(weight: torch.Tensor) -> str:
    """sha256 hex of the tensor's raw bytes (any dtype; dtype and shape are not part of it)."""
    flat = weight.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256()
    digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()
