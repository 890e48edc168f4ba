"""A direction against a subspace of the residual stream: choosing k, projecting a subspace
out of the residual, alignment ρ and its random baselines.

The basis is any orthonormal ``[hidden, k]`` matrix (columns span the subspace), typically the
null space of the unembedding from :mod:`calibrate.core.nullspace`; nothing here depends on how
it was found. Alignments are computed in float64 on the CPU, random directions and subspaces
from a seeded CPU generator.

LayerNorm centring (Phi-2, GPT-2, as opposed to RMSNorm in Llama/Mistral/SmolLM2): LayerNorm
subtracts the per-token mean before scaling, so the centred vector has no component along the
all-ones direction 1, and a residual-stream component along 1 is invisible to the logits
whatever W_U is. Such a direction is a null direction of the *model*, not necessarily of W_U,
so the bottom singular vectors of W_U may or may not contain it;
``ones_direction_alignment`` reports how much of 1/√hidden lies in a given basis. RMSNorm does
not centre, so for those models 1 is not special.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

DEFAULT_FRACTION = 0.01


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
