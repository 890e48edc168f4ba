"""Steering: add eta * c_hat to the residual and read every layer again.

With a causal model, steering the last position at layer l changes nothing at earlier
positions and nothing below layer l, so each prompt runs once and every eta runs only the
last position through the blocks above l, on the prompt's key/value cache
(:mod:`calibrate.engine.upper`); at the last layer no block runs at all. Prompts that share an
exemplar prefix run it once per group (:mod:`calibrate.engine.prefix`). Steering at all
positions needs a full forward pass per eta.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from calibrate import values
from calibrate.core.metrics import layer_table
from calibrate.engine.hooks import capture_last_position, edit_residual
from calibrate.core.option_scores import option_probabilities
from calibrate.engine.lens import LogitLens
from calibrate.engine.readout import Readout
from calibrate.engine.probe import (
    ProbeSettings,
    check_finite,
    left_pad,
    position_ids,
    tokenize,
)
from calibrate.engine.upper import PrefixState, prefix_states, upper_forward
from calibrate.model.load import LoadedModel
from calibrate.tasks.prompts import PromptSet
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
    keys it uses (:attr:`calibrate.studies.base.Study.reads`) and the others are reported unused.
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


def _read(lens: Readout, store: list[torch.Tensor], option_ids: torch.Tensor,
          first_layer: int = 0) -> torch.Tensor:
    """Option logits [B, L', K] of the residuals of layers ``first_layer``.. (one per tensor)."""
    stacked = torch.stack([t.to(lens.device) for t in store], dim=1)
    check_finite(stacked)
    layers = range(first_layer, first_layer + stacked.shape[1])
    return lens.option_logits(lens.prepare(stacked, layers), option_ids)


def variants_per_pass(n_examples: int, width: int, n_upper: int, token_budget: int) -> int:
    """How many variants of each example one upper pass runs: each row holds a copy of its
    prompt's cache for ``n_upper`` blocks, kept within ``token_budget`` cached (token x block)
    entries."""
    return max(1, token_budget // max(n_examples * width * max(n_upper, 1), 1))


def steer_batch_cached(loaded: LoadedModel, lens: Readout, state: PrefixState,
                       option_ids: torch.Tensor, steering: Intervention,
                       token_budget: int = 8192 * 32) -> torch.Tensor:
    """All variants for one batch: [B, V, L+1, K] option logits.

    ``state`` holds the prompts run once, unedited (:func:`calibrate.engine.upper.prefix_states`,
    or :func:`~calibrate.engine.upper.last_states` after a shared prefix); each variant of the
    last position then runs only the blocks from the lowest edited layer on, on the prompts'
    key/value cache. The layers below it are the same for every variant.
    """
    n_var, n_ex, n_layers = steering.n_variants, len(state.last_ids), loaded.adapter.num_blocks + 1
    start = min(steering.layers)
    later = [layer for layer in steering.layers if layer > start]
    with torch.inference_mode():
        check_finite(state.residuals)
        below = _read(lens, list(state.residuals[:, :start].unbind(1)), option_ids) if start else None
        step = variants_per_pass(n_ex, state.mask.shape[1], n_layers - 1 - start, token_budget)
        parts = []
        for lo in range(0, n_var, step):
            variants = torch.arange(lo, min(lo + step, n_var))
            rows = torch.arange(n_ex).repeat_interleave(len(variants))  # row: example, variant
            row_variants = variants.repeat(n_ex)
            hidden = state.residuals[rows.to(state.residuals.device), start]
            if start in steering.layers:
                hidden = steering.apply(start, hidden[:, None], row_variants)[:, 0]
            with edit_residual(loaded.adapter, later, editor(steering, row_variants, True)):
                upper = upper_forward(loaded, state, start, hidden, rows)
            logits = _read(lens, list(upper.unbind(1)), option_ids[rows], start)
            parts.append(logits.reshape(n_ex, len(variants), *logits.shape[1:]))
        out = torch.cat(parts, dim=1)  # [B, V, L+1-start, K]
    if below is None:
        return out
    return torch.cat([below[:, None].expand(-1, n_var, -1, -1), out], dim=2)


def steer_batch_full(loaded: LoadedModel, lens: Readout, ids: torch.Tensor, mask: torch.Tensor,
                     option_ids: torch.Tensor, steering: Intervention) -> torch.Tensor:
    """All variants for one batch with a full forward pass per variant: [B, V, L+1, K]."""
    device, out = loaded.device, []
    last_only = steering.position == "last"
    with torch.inference_mode():
        for variant in range(steering.n_variants):
            row_variants = torch.full((ids.shape[0],), variant, dtype=torch.long)
            with edit_residual(loaded.adapter, list(steering.layers), editor(steering, row_variants, last_only)), \
                    capture_last_position(loaded.adapter) as store:
                loaded.adapter.backbone(input_ids=ids.to(device), attention_mask=mask.to(device),
                                        position_ids=position_ids(mask).to(device), use_cache=False)
            out.append(_read(lens, store, option_ids))
    return torch.stack(out, dim=1)


def run_steered(loaded: LoadedModel, prompt_set: PromptSet, steering: Intervention,
                settings: ProbeSettings | None = None, use_cache: bool = True,
                readout: Readout | None = None) -> np.ndarray:
    """Option logits [V, N, L+1, K] of every variant (eta), every example, every layer, read
    through ``readout`` (default: the logit lens).

    An edit of the last position runs each prompt once and each variant above the edit only;
    prompts sharing an exemplar prefix (``prompt_set.groups``, ``settings.prefix_reuse``) run it
    once per group. An edit of every position, or ``use_cache=False``, is one full pass per
    variant of every whole prompt.
    """
    from calibrate.engine.context import suffix_contexts
    from calibrate.engine.prefix import grouped_batches
    from calibrate.engine.upper import last_states

    settings = settings or ProbeSettings()
    token_ids = tokenize(loaded, prompt_set.prompts)
    lens = readout or LogitLens(loaded.adapter)
    n, k = prompt_set.option_ids.shape
    out = np.empty((steering.n_variants, n, loaded.adapter.num_blocks + 1, k), dtype=np.float32)
    cached = use_cache and steering.position == "last"
    budget = settings.max_tokens * loaded.adapter.num_blocks

    def run(idx: np.ndarray, _settings: ProbeSettings, prefix) -> torch.Tensor:
        option_ids = torch.from_numpy(prompt_set.option_ids[idx])
        if prefix is not None:
            with torch.inference_mode():
                state = last_states(loaded, suffix_contexts(
                    loaded, prefix, [token_ids[i][prefix.length:] for i in idx]))
            return steer_batch_cached(loaded, lens, state, option_ids, steering, budget)
        ids, mask = left_pad([token_ids[i] for i in idx], loaded.tokenizer.pad_token_id)
        if cached and ids.shape[1] > 1:
            with torch.inference_mode():
                state = prefix_states(loaded, ids, mask)
            return steer_batch_cached(loaded, lens, state, option_ids, steering, budget)
        return steer_batch_full(loaded, lens, ids, mask, option_ids, steering)

    with tqdm(total=n, desc=f"{type(steering).__name__.lower()} {loaded.name} x{steering.n_variants}", unit="ex",
              disable=not settings.progress) as bar:
        # an edit of every position would change the shared prefix too: those run whole
        groups = prompt_set.groups if cached else None
        for idx, logits in grouped_batches(loaded, token_ids, groups, settings, run, gapped=True):
            out[:, idx] = logits.transpose(0, 1).cpu().numpy()
            bar.update(len(idx))
    return out


def steering_table(logits: np.ndarray, labels: np.ndarray, etas: Sequence[Any], n_bins: int,
                   binning: str, reference: int, column: str = "eta") -> pd.DataFrame:
    """Per variant (eta) and layer: metrics, deltas against the variant at index ``reference``
    (eta 0), and the share of examples whose predicted answer changed."""
    probs = option_probabilities(logits)  # [E, N, L+1, K]
    tables = [layer_table(p, labels, n_bins=n_bins, binning=binning) for p in probs]
    base, base_pred = tables[reference], probs[reference].argmax(-1)
    rows = []
    for eta, table, p in zip(etas, tables, probs):
        table = table.copy()
        for metric in ("accuracy", "ece", "mce"):
            table[f"delta_{metric}"] = table[metric] - base[metric]
        table["changed"] = (p.argmax(-1) != base_pred).mean(axis=0)
        table.insert(0, column, eta)
        rows.append(table)
    return pd.concat(rows, ignore_index=True)
