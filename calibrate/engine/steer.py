"""Steered passes: add an edit to the residual and read every layer again.

With a causal model, an edit of the last position at layer l changes nothing at earlier
positions and nothing below layer l, so each prompt runs once and every variant runs only the
last position through the blocks above l, on the prompt's key/value cache
(:mod:`calibrate.engine.upper`); at the last layer no block runs at all. Prompts that share an
exemplar prefix run it once per group (:mod:`calibrate.engine.prefix`). An edit of every
position needs a full forward pass per variant. The edits are :mod:`calibrate.engine.edits`.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from calibrate.engine.edits import Intervention, editor
from calibrate.engine.hooks import capture_last_position, edit_residual
from calibrate.engine.lens import LogitLens
from calibrate.engine.probe import (
    ProbeSettings,
    check_finite,
    left_pad,
    position_ids,
    tokenize,
)
from calibrate.engine.readout import Readout
from calibrate.engine.upper import PrefixState, prefix_states, upper_forward
from calibrate.model.load import LoadedModel
from calibrate.tasks.prompts import PromptSet


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


