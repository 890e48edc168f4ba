"""Edits of the residual stream: what a study changes, where, and in how many variants.

An :class:`Intervention` edits the residual at some layers in ``n_variants`` ways, one per batch
row; variant 0 is the reference (no change) of every delta. :class:`Steering` adds η·ĉ (one
variant per η), :class:`DirectionSweep` adds each of several directions at each η (the random
null), :class:`SubspaceAblation` removes subspaces (the null-space truncation and its controls).
The passes that run them are :mod:`calibrate.engine.steer` (single-token answers) and
:mod:`calibrate.engine.cloze_steer` (cloze).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from calibrate import values
from calibrate.core import subspace
from calibrate.errors import UserError

POSITIONS = ("last", "all")
ETA_SCALES = ("absolute", "residual_norm")
ABLATIONS = ("zero", "mean")  # subspace ablations: project out, or replace by the mean


class SteeringError(UserError):
    """An intervention setting is invalid."""


@dataclass
class InterventionSettings:
    """The ``intervention`` group: the study (``name``) and where and how the residual is edited.

    One schema for every study, so an edit setting composes whatever the study; a study reads the
    keys it uses (:attr:`calibrate.studies.study.Study.reads`) and the others are reported unused.
    """

    name: str = "probe"  # the study (one of the registered studies)
    layers: tuple[int, ...] | None = None  # residual layers to edit; None: the last layer
    position: str = "last"  # last: the last prompt position | all: every position
    eta_scale: str = "absolute"  # absolute | residual_norm: eta in units of the mean residual norm
    ablation: str = "zero"  # subspace ablations: zero (project out) | mean (the calibration mean)
    use_cache: bool = True  # position=last: run the prompt once, each variant on its last token

    def __post_init__(self) -> None:
        values.text("intervention.name", self.name)
        self.layers = values.layer_list("intervention.layers", self.layers, (None,))
        values.choice("intervention.position", self.position, POSITIONS)
        values.choice("intervention.eta_scale", self.eta_scale, ETA_SCALES)
        values.choice("intervention.ablation", self.ablation, ABLATIONS)
        values.flag("intervention.use_cache", self.use_cache)


class Intervention:
    """Edits the residual at some layers in ``n_variants`` ways, one per batch row.

    Subclasses implement :meth:`apply`; variant 0 is the reference (no change) of every delta.
    """

    layers: tuple[int, ...] = ()
    position: str = "last"

    @property
    def n_variants(self) -> int:
        """How many versions of each example are run."""
        raise NotImplementedError

    def apply(self, layer: int, hidden: torch.Tensor, variant: torch.Tensor) -> torch.Tensor:
        """Edited ``hidden`` [R, T, H]; ``variant`` [R] says which version each row is."""
        raise NotImplementedError


@dataclass(frozen=True)
class Steering(Intervention):
    """Add eta * vector at ``layers``; one variant per eta."""

    vector: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [hidden] unit direction
    layers: tuple[int, ...] = ()  # residual layers to edit (0 = input of block 0, l = output of block l)
    etas: tuple[float, ...] = (0.0,)
    position: str = "last"
    layer_scale: Mapping[int, float] | None = None  # eta multiplier per layer (residual_norm mode)

    @property
    def n_variants(self) -> int:
        return len(self.etas)

    def scale(self, layer: int) -> float:
        """Multiplier of eta at ``layer`` (1 for absolute units)."""
        return layer_multiplier(self.layer_scale, layer)

    def apply(self, layer: int, hidden: torch.Tensor, variant: torch.Tensor) -> torch.Tensor:
        return add_scaled(hidden, np.asarray(self.vector)[None], self.etas, self.scale(layer),
                          torch.zeros_like(variant), variant)


@dataclass(frozen=True)
class DirectionSweep(Intervention):
    """Every one of several unit directions at every eta: variant ``d * len(etas) + e`` adds
    ``etas[e] * vectors[d]`` at ``layers`` (the random-direction null beside c_hat)."""

    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [D, hidden]
    layers: tuple[int, ...] = ()
    etas: tuple[float, ...] = (0.0,)
    position: str = "last"
    layer_scale: Mapping[int, float] | None = None

    @property
    def n_variants(self) -> int:
        return len(self.vectors) * len(self.etas)

    def apply(self, layer: int, hidden: torch.Tensor, variant: torch.Tensor) -> torch.Tensor:
        n_etas = len(self.etas)
        return add_scaled(hidden, self.vectors, self.etas, layer_multiplier(self.layer_scale, layer),
                          variant // n_etas, variant % n_etas)


def layer_multiplier(layer_scale: Mapping[int, float] | None, layer: int) -> float:
    """Multiplier of eta at ``layer``: the layer's residual norm, or 1 in absolute units."""
    return 1.0 if not layer_scale else float(layer_scale[layer])


def add_scaled(hidden: torch.Tensor, vectors: np.ndarray, etas: Sequence[float], scale: float,
               which_vector: torch.Tensor, which_eta: torch.Tensor) -> torch.Tensor:
    """``hidden`` [R, T, H] plus, in row r, ``etas[which_eta[r]] * scale * vectors[which_vector[r]]``."""
    vecs = torch.as_tensor(vectors, dtype=hidden.dtype, device=hidden.device)
    eta = torch.as_tensor(etas, dtype=torch.float64)[which_eta.cpu()] * scale
    shift = eta.to(hidden.device, hidden.dtype)[:, None] * vecs[which_vector.to(hidden.device)]
    return hidden + shift[:, None, :]


def check_steering(layers: Sequence[int], num_layers: int, position: str, eta_scale: str) -> list[int]:
    """Validate intervention settings against a model with ``num_layers`` layers."""
    layers = [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x <= num_layers - 1]
    if not layers or bad:
        raise SteeringError(f"intervention.layers={layers}: each must be in 0..{num_layers - 1}")
    if position not in POSITIONS:
        raise SteeringError(f"intervention.position={position!r}; accepted: {', '.join(POSITIONS)}")
    if eta_scale not in ETA_SCALES:
        raise SteeringError(f"intervention.eta_scale={eta_scale!r}; accepted: {', '.join(ETA_SCALES)}")
    return layers


def residual_norms(residuals: Mapping[int, np.ndarray], layers: Sequence[int]) -> dict[int, float]:
    """Mean L2 norm of the residual at each layer (the unit of eta with ``residual_norm``)."""
    return {layer: float(np.linalg.norm(residuals[layer].astype(np.float64), axis=1).mean())
            for layer in layers}


def editor(intervention: Intervention, row_variants: torch.Tensor, last_only: bool):
    """The residual edit of ``intervention``: every row r is variant ``row_variants[r]``; with
    ``last_only`` only the last position changes (prompts are left-padded)."""
    def edit(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if not last_only:
            return intervention.apply(layer, hidden, row_variants)
        hidden = hidden.clone()
        hidden[:, -1:] = intervention.apply(layer, hidden[:, -1:], row_variants)
        return hidden
    return edit


@dataclass(frozen=True)
class SubspaceAblation(Intervention):
    """Variant 0: unchanged; variant v >= 1: remove span(bases[v-1]) (or replace it by the mean)."""

    bases: tuple[np.ndarray, ...] = ()  # each [hidden, k], orthonormal columns
    layers: tuple[int, ...] = ()
    position: str = "last"
    means: Mapping[int, np.ndarray] | None = None  # layer -> mean residual (mean ablation)
    names: tuple[str, ...] = field(default=())

    @property
    def n_variants(self) -> int:
        return 1 + len(self.bases)

    def apply(self, layer: int, hidden: torch.Tensor, variant: torch.Tensor) -> torch.Tensor:
        out = hidden.clone()
        mean = None
        if self.means is not None:
            mean = torch.as_tensor(self.means[layer], device=hidden.device)
        for v, basis in enumerate(self.bases, start=1):
            rows = (variant == v).to(hidden.device)
            if bool(rows.any()):
                u = torch.as_tensor(basis, device=hidden.device)
                out[rows] = subspace.truncate(hidden[rows], u, mean)
        return out


