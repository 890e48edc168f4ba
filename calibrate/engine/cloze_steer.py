"""Cloze scoring under an edit of the context's last position, every variant on one context pass.

An edit at layer ``l`` of the last context position changes nothing before that position and
nothing below layer ``l``. So per batch: the context without its last token runs once (its
key/value cache kept); each option's *tail* — the last context token followed by the
continuation without its last token — runs once unedited through every block (the layers below
``l``, the same for every variant); then every variant runs the tails through the blocks from
``l`` on only, with the edit at tail position 0. At the last layer no block runs, and only the
states at the context's last position are read again. Contexts that share an exemplar prefix
(``prompt.shots``) start from its cache, run once per group; only each context's own suffix
runs before the tails (:mod:`calibrate.engine.context`).

Every continuation token's log-probability is read through the lens (full-vocabulary
log-softmax) at the state before it, each distinct state once
(:func:`calibrate.engine.cloze_plan.token_plan`), and summed into the option's log-likelihood.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from calibrate.engine.cloze import capture_positions, cloze_readout, lens_logprobs
from calibrate.engine.cloze_plan import continuation_groups, right_pad, token_plan
from calibrate.engine.context import suffix_contexts, whole_contexts
from calibrate.engine.edits import Intervention
from calibrate.engine.hooks import edit_residual
from calibrate.engine.prefix import SharedPrefix, grouped_batches
from calibrate.engine.probe import ProbeSettings, check_finite, left_pad
from calibrate.engine.readout import Readout
from calibrate.engine.steer import variants_per_pass
from calibrate.engine.upper import (
    cache_argument,
    capture_upper,
    only_blocks_from,
    rows_cache,
)
from calibrate.model.load import LoadedModel
from calibrate.tasks.continuations import ClozeRequest


def _edit_first(intervention: Intervention, row_variants: torch.Tensor):
    """The residual edit at tail position 0 (the context's last token) of every row."""
    def edit(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        hidden[:, :1] = intervention.apply(layer, hidden[:, :1], row_variants)
        return hidden
    return edit


class _Tails:
    """One batch's context cache and option tails, run once unedited.

    Tails run in groups of similar width (:func:`calibrate.engine.cloze_plan.continuation_groups`)
    so a short option is not padded to the longest; states are kept at the batch's full width.
    """

    def __init__(self, loaded: LoadedModel, batch: Sequence[ClozeRequest],
                 settings: ProbeSettings, prefix: SharedPrefix | None = None) -> None:
        device = loaded.device
        pad = loaded.tokenizer.pad_token_id
        if prefix is None:
            ids, mask = left_pad([r.context_ids for r in batch], pad)
            context = whole_contexts(loaded, ids, mask)
        else:
            context = suffix_contexts(loaded, prefix,
                                      [r.context_ids[prefix.length:] for r in batch])
        counts = torch.tensor([r.n_options for r in batch])
        self.row_example = torch.repeat_interleave(torch.arange(len(batch)), counts)
        self.conts = [c for r in batch for c in r.continuations]
        last_ids = context.last_ids.tolist()
        tails = [[last_ids[b]] + list(c[:-1]) for b, c in zip(self.row_example.tolist(), self.conts)]
        self.widths = [len(t) for t in tails]
        self.width = max(self.widths)
        self.groups = [torch.as_tensor(g) for g in continuation_groups(self.widths, settings)]
        tail_ids, tail_mask = right_pad(tails, pad, self.width)
        self.ids, self.tail_mask = tail_ids.to(device), tail_mask.to(device)
        rows = self.row_example.to(context.mask.device)
        self.ctx_mask = context.mask[rows].to(device)
        self.pos = (context.last_positions[rows][:, None].to(device)
                    + torch.arange(self.width, device=device))
        self.first_rows = torch.cumsum(counts, 0) - counts  # each example's first row
        self.n_examples = len(batch)
        self.cache = context.cache
        with torch.no_grad():
            states = None
            for rows in self.groups:
                width = max(self.widths[r] for r in rows.tolist())
                with capture_positions(loaded.adapter, slice(None)) as store:
                    self._run(loaded, rows, self.ids[rows, :width], 0)
                group = torch.stack(store, dim=2)  # [rows, width, L+1, H]
                if states is None:
                    states = group.new_zeros((len(self.conts), self.width, *group.shape[2:]))
                states[rows.to(states.device), :width] = group
        self.states = states  # [R, W, L+1, H] unedited (zeros past each tail's end)
        check_finite(self.states)
        self.plan = token_plan(self.conts, self.row_example.tolist(),
                               [self.n_examples + r * (self.width - 1) for r in range(len(self.conts))])

    def _run(self, loaded: LoadedModel, rows: torch.Tensor, ids: torch.Tensor, start: int) -> None:
        """Run tails ``rows`` (token ids ``ids`` [r, w]) on the context cache, from block ``start``."""
        backbone, width = loaded.adapter.backbone, ids.shape[1]
        example_rows = self.row_example[rows]
        kwargs = {} if self.cache is None else {
            cache_argument(backbone): rows_cache(self.cache, example_rows, start)}
        rows = rows.to(self.ids.device)
        backbone(input_ids=ids, attention_mask=torch.cat([self.ctx_mask[rows],
                                                          self.tail_mask[rows, :width]], dim=1),
                 position_ids=self.pos[rows, :width], use_cache=self.cache is not None, **kwargs)

    def sources(self, tails: torch.Tensor) -> torch.Tensor:
        """The plan's sources from tail states [R, W, n, H]: each example's context state, then
        every row's continuation positions."""
        return torch.cat([tails[self.first_rows, 0], tails[:, 1:].flatten(0, 1)], dim=0)

    def upper(self, loaded: LoadedModel, intervention: Intervention, start: int,
              variants: torch.Tensor) -> torch.Tensor:
        """Tail states [R * v, W, L+1-start, H] of ``variants`` (row r * v + i: row r, variant i)."""
        n_var = len(variants)
        rows = torch.arange(len(self.conts)).repeat_interleave(n_var)
        hidden = self.states[rows.to(self.states.device), :, start]
        if start in intervention.layers:
            hidden = _edit_first(intervention, variants.repeat(len(self.conts)))(start, hidden)
        if start == loaded.adapter.num_blocks:
            return hidden[:, :, None]
        later = [layer for layer in intervention.layers if layer > start]
        out = hidden.new_zeros((len(rows), self.width, loaded.adapter.num_blocks + 1 - start,
                                hidden.shape[-1]))
        for group in self.groups:
            width = max(self.widths[r] for r in group.tolist())
            at = (group[:, None] * n_var + torch.arange(n_var)).flatten()  # rows of the r*v layout
            injected = hidden[at.to(hidden.device), :width].to(loaded.device)
            group_variants = variants.repeat(len(group))
            with only_blocks_from(loaded.adapter, start, injected), \
                    edit_residual(loaded.adapter, later, _edit_first(intervention, group_variants)), \
                    capture_upper(loaded.adapter, start, slice(None)) as store:
                self._run(loaded, rows[at], self.ids[rows[at].to(self.ids.device), :width], start)
            out[at.to(out.device), :width] = torch.stack([injected, *store], dim=2).to(out.device)
        return out


def cloze_steered_batch(loaded: LoadedModel, batch: Sequence[ClozeRequest],
                        intervention: Intervention, settings: ProbeSettings,
                        token_budget: int, prefix: SharedPrefix | None = None,
                        readout: Readout | None = None) -> torch.Tensor:
    """Per-option log-likelihoods [V, R, L+1] float64 of one batch (rows in (example, option)
    order) under every variant; ``prefix``: every context starts with it (its cache is reused)."""
    lens, max_rows = cloze_readout(loaded.adapter, readout)
    n_layers = loaded.adapter.num_blocks + 1
    start = min(intervention.layers)
    with torch.inference_mode():
        tails = _Tails(loaded, batch, settings, prefix)
        plan = tails.plan
        src = plan.state_src.to(tails.states.device)
        token_row = plan.token_row.to(lens.device)
        base = lens_logprobs(lens, tails.sources(tails.states)[src], plan.token_state,
                             plan.token_target, max_rows)  # [M, L+1] unedited
        # at the last layer only the context's last state changes; elsewhere every state does
        changed = src < tails.n_examples if start == n_layers - 1 else torch.ones_like(src, dtype=torch.bool)
        changed_states = changed.nonzero().squeeze(1)
        remap = torch.full((len(src),), -1, dtype=torch.long)
        remap[changed_states.cpu()] = torch.arange(len(changed_states))
        tok_sel = (remap[plan.token_state] >= 0).nonzero().squeeze(1)
        n_rows, n_var = len(tails.conts), intervention.n_variants
        out = torch.empty((n_var, n_rows, n_layers), dtype=torch.float64)
        step = variants_per_pass(n_rows, tails.ctx_mask.shape[1] + tails.width, n_layers - 1 - start,
                                 token_budget)
        for lo in range(0, n_var, step):
            variants = torch.arange(lo, min(lo + step, n_var))
            upper = tails.upper(loaded, intervention, start, variants)
            check_finite(upper.flatten(0, 1))
            for i, variant in enumerate(variants.tolist()):
                states = tails.sources(upper[i::len(variants)])[src[changed_states]]
                lp = base.clone()
                lp[tok_sel, start:] = lens_logprobs(lens, states, remap[plan.token_state[tok_sel]],
                                                    plan.token_target[tok_sel], max_rows, start)
                loglik = torch.zeros((n_rows, n_layers), dtype=torch.float64, device=lens.device)
                loglik.index_add_(0, token_row, lp)
                out[variant] = loglik.cpu()
    return out


def cloze_loglik_steered(loaded: LoadedModel, requests: Sequence[ClozeRequest],
                         intervention: Intervention, settings: ProbeSettings,
                         desc: str = "cloze steered",
                         groups: Sequence[str] | None = None,
                         readout: Readout | None = None) -> np.ndarray:
    """Summed log-likelihoods [V, N, L+1, K] float64 (-inf padded) under every variant of an
    edit of the context's last position. Contexts of one of ``groups`` share their exemplar
    prefix: it runs once per group with ``settings.prefix_reuse``."""
    n, k = len(requests), max(r.n_options for r in requests)
    n_var, n_layers = intervention.n_variants, loaded.adapter.num_blocks + 1
    loglik = np.full((n_var, n, n_layers, k), -np.inf)
    widest = [max(map(len, r.continuations)) for r in requests]
    budget = settings.max_tokens * loaded.adapter.num_blocks
    with tqdm(total=n, desc=f"{desc} {loaded.name} x{n_var}", unit="ex",
              disable=not settings.progress) as bar:
        def run(idx: np.ndarray, current: ProbeSettings, prefix: SharedPrefix | None):
            return cloze_steered_batch(loaded, [requests[i] for i in idx], intervention, current,
                                       budget, prefix, readout)

        for idx, rows in grouped_batches(loaded, [r.context_ids for r in requests], groups,
                                         settings, run, extra=widest, gapped=True):
            rows, at = rows.numpy(), 0
            for i in idx:
                kk = requests[i].n_options
                loglik[:, i, :, :kk] = rows[:, at:at + kk].transpose(0, 2, 1)
                at += kk
            bar.update(len(idx))
    return loglik
