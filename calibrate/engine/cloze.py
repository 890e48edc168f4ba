"""Cloze scoring through the lens: each option's continuation log-likelihood at every layer.

lm-eval's log-likelihood scoring of multiple-choice tasks (ARC, HellaSwag, PIQA, COPA, OpenBookQA,
SciQ), read at every layer: option k is the continuation ``" " + option`` of the rendered context;
at layer l each continuation token's log-probability is read through the lens (final norm
recomputed, full-vocabulary log-softmax) at the position before it, and the log-probabilities are
summed into the option's log-likelihood at layer l. The last layer is the model's own score.

Cost: the context runs once per example; its key/value cache is selected once per option and only
the continuation tokens (all but the last, which predicts nothing) run again, right-padded, in
groups of similar length. The lens's full-vocabulary normalizer is computed once per distinct
predicting state: every option shares the context's last position, and options that begin with
the same tokens share those positions too. Which tokens run where, and which state predicts
each continuation token, is planned in :mod:`calibrate.engine.cloze_plan`. Contexts that share
an exemplar prefix (``prompt.shots``) run it once per group; only each context's own suffix runs
after its cache (:mod:`calibrate.engine.prefix`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from calibrate.core.option_scores import option_probabilities
from calibrate.engine.cloze_plan import continuation_groups, right_pad, source_layout, token_plan
from calibrate.engine.edits import Intervention, editor
from calibrate.engine.hooks import capture_layers, edit_residual
from calibrate.engine.lens import LogitLens
from calibrate.engine.prefix import SharedPrefix, grouped_batches, run_suffixes
from calibrate.engine.probe import (
    ProbeResult,
    ProbeSettings,
    check_finite,
    left_pad,
    position_ids,
)
from calibrate.engine.readout import Readout
from calibrate.engine.upper import cache_argument
from calibrate.model.adapters import Adapter
from calibrate.model.load import LoadedModel
from calibrate.tasks.continuations import ClozeRequest, cloze_divisors

LENS_ROWS = 2048  # (state, layer) rows per full-vocabulary lens step on an accelerator
LENS_ROWS_CPU, LENS_VOCAB_CPU = 256, 4096  # on CPU: rows per step, vocabulary rows per chunk


def capture_positions(adapter: Adapter, positions: int | slice):
    """Collect ``hidden[:, positions]`` of every layer (L + 1 tensors, detached copies)."""
    return capture_layers(adapter, lambda hidden: hidden[:, positions])


def cloze_readout(adapter: Adapter, readout: Readout | None = None) -> tuple[Readout, int]:
    """The readout (default: the logit lens) and its (state x layer) rows per full-vocabulary
    step, sized for the device.

    On CPU small steps (256 rows x 4096 vocabulary rows) stay in cache and measured 1.5-2x
    faster than 512 x 32768; accelerators take 2048 x ``LogitLens.vocab_chunk``. Memory stays
    bounded by rows x vocabulary step, whatever the vocabulary size. Cloze scoring reads every
    continuation token, so a readout of the options alone is refused.
    """
    readout = LogitLens(adapter) if readout is None else copy.copy(readout)
    if not readout.full_vocabulary:
        raise ValueError(f"the {readout.name} readout reads only the answer options; cloze "
                         "scoring needs a readout of the whole vocabulary")
    if readout.device.type == "cpu":
        if hasattr(readout, "vocab_chunk"):
            readout.vocab_chunk = LENS_VOCAB_CPU  # this copy only
        return readout, LENS_ROWS_CPU
    return readout, LENS_ROWS


def lens_logprobs(lens: Readout, states: torch.Tensor, token_state: torch.Tensor,
                  token_target: torch.Tensor, max_rows: int = 256, first_layer: int = 0
                  ) -> torch.Tensor:
    """Full-vocabulary log-probabilities of each token: states [S, L', H] of the layers
    ``first_layer``.. -> [M, L'] float64.

    States are processed ``max_rows // (L+1)`` at a time so no [states, L+1, vocab] tensor is
    ever materialized; only the target tokens' logits are gathered.
    """
    n_layers = states.shape[1]
    step = max(1, max_rows // n_layers)
    token_state, token_target = token_state.to(lens.device), token_target.to(lens.device)
    out = torch.empty((len(token_state), n_layers), dtype=torch.float64, device=lens.device)
    for start in range(0, states.shape[0], step):
        normed = lens.prepare(states[start:start + step],
                              range(first_layer, first_layer + n_layers))  # [s, L', H]
        lse = lens.vocab_logsumexp(normed)  # [s, L+1] float64
        sel = ((token_state >= start) & (token_state < start + step)).nonzero().squeeze(1)
        local = token_state[sel] - start
        target = lens.option_logits(normed[local], token_target[sel, None])[..., 0]  # [m, L+1]
        out[sel] = target.double() - lse[local]
    return out


@dataclass
class BatchOutput:
    """Per-option log-likelihoods of one batch and what else the caller keeps."""

    loglik: torch.Tensor  # [R, L+1] float64, rows in (example, option) order
    context_last: torch.Tensor  # [B, L+1, H] the last context position's residuals
    real_tokens: int
    computed_tokens: int


def _context_pass(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool,
                  out_device: torch.device, edit: tuple[Intervention, int] | None = None):
    """Run the left-padded contexts: ([B, L+1, H] last-position residuals, key/value cache).

    ``edit`` = (intervention, variant) edits the context's residual (its last position, or all
    of its positions with ``position: all``); the continuations then read the edited cache.
    """
    device, backbone = loaded.device, loaded.adapter.backbone
    with ExitStack() as stack:
        if edit is not None:
            intervention, variant = edit
            rows = torch.full((ids.shape[0],), variant, dtype=torch.long)
            stack.enter_context(edit_residual(loaded.adapter, list(intervention.layers),
                                              editor(intervention, rows,
                                                     intervention.position == "last")))
        store = stack.enter_context(capture_positions(loaded.adapter, -1))
        out = backbone(input_ids=ids.to(device), attention_mask=mask.to(device),
                       position_ids=position_ids(mask).to(device), use_cache=use_cache)
    cache = (getattr(out, "cache", None) or out.past_key_values) if use_cache else None
    return torch.stack([t.to(out_device) for t in store], dim=1), cache


def _continuation_pass(loaded: LoadedModel, cache, mask: torch.Tensor, row_example: torch.Tensor,
                       inputs: Sequence[Sequence[int]],
                       out_device: torch.device) -> tuple[torch.Tensor, int]:
    """Run continuation tokens right-padded on the context cache (changed in place):
    ([R, W, L+1, H] residuals on ``out_device``, real tokens run)."""
    device, backbone = loaded.device, loaded.adapter.backbone
    width = max(len(seq) for seq in inputs)
    cache.batch_select_indices(row_example)  # row r: example row_example[r]
    ids, cont_mask = right_pad(inputs, loaded.tokenizer.pad_token_id, width)
    full_mask = torch.cat([mask[row_example], cont_mask], dim=1)  # context mask + continuation mask
    pos = mask.sum(1)[row_example][:, None] + torch.arange(width)
    with capture_positions(loaded.adapter, slice(None)) as store:
        backbone(input_ids=ids.to(device), attention_mask=full_mask.to(device),
                 position_ids=pos.to(device), use_cache=True, **{cache_argument(backbone): cache})
    return torch.stack([t.to(out_device) for t in store], dim=2), int(cont_mask.sum())


def cloze_batch(loaded: LoadedModel, lens: Readout, batch: Sequence[ClozeRequest],
                settings: ProbeSettings, max_rows: int = 256,
                edit: tuple[Intervention, int] | None = None,
                prefix: SharedPrefix | None = None) -> BatchOutput:
    """Every option's log-likelihood at every layer for a batch of examples.

    The contexts run once (left-padded, key/value cache kept; or, given a ``prefix`` every
    context starts with, only their suffixes after its cache, right-padded); the continuations
    (each without its last token, which predicts nothing) run on a copy of that cache selected
    per option, in groups of similar length. Only the states the lens reads are kept from each
    pass. ``edit`` (intervention, variant) edits the context pass only (whole contexts).
    """
    conts = [c for r in batch for c in r.continuations]
    counts = torch.tensor([r.n_options for r in batch])
    row_example = torch.repeat_interleave(torch.arange(len(batch)), counts)  # row -> its example
    widths = [len(c) - 1 for c in conts]  # the last token of a continuation predicts nothing
    groups = continuation_groups(widths, settings)
    row_base, starts = source_layout(widths, groups, len(batch))
    plan = token_plan(conts, row_example.tolist(), row_base)
    src = plan.state_src.to(lens.device)
    with torch.inference_mode():
        if prefix is None:
            ids, mask = left_pad([r.context_ids for r in batch], loaded.tokenizer.pad_token_id)
            context_last, cache = _context_pass(loaded, ids, mask, bool(groups), lens.device, edit)
            real, computed = int(mask.sum()), mask.numel()
        else:
            if edit is not None:
                raise ValueError("an edited context pass cannot start from a shared prefix cache")
            cache, mask, context_last = run_suffixes(
                loaded, prefix, [r.context_ids[prefix.length:] for r in batch], read_last=True)
            context_last = context_last.to(lens.device)
            real, computed = int(mask[:, prefix.length:].sum()), mask[:, prefix.length:].numel()
        states = context_last.new_empty((len(src), *context_last.shape[1:]))  # [S, L+1, H]
        _take(states, src, context_last, 0)
        for g, rows in enumerate(groups):
            group_cache = cache if g == len(groups) - 1 else copy.deepcopy(cache)
            hidden, group_real = _continuation_pass(loaded, group_cache, mask, row_example[rows],
                                                    [conts[r][:-1] for r in rows], lens.device)
            _take(states, src, hidden.flatten(0, 1), starts[g])
            real, computed = real + group_real, computed + hidden.shape[0] * hidden.shape[1]
            del group_cache, hidden
        del cache
        check_finite(states)
        logprobs = lens_logprobs(lens, states, plan.token_state, plan.token_target, max_rows)
        loglik = torch.zeros((len(conts), states.shape[1]), dtype=torch.float64, device=lens.device)
        loglik.index_add_(0, plan.token_row.to(lens.device), logprobs)
    return BatchOutput(loglik.cpu(), context_last, real, computed)


def _take(states: torch.Tensor, src: torch.Tensor, piece: torch.Tensor, start: int) -> None:
    """Copy into ``states`` the rows whose source lies in ``piece`` (sources start..start+len)."""
    sel = ((src >= start) & (src < start + piece.shape[0])).nonzero().squeeze(1)
    states[sel] = piece[src[sel] - start]


def cloze_loglik(loaded: LoadedModel, requests: Sequence[ClozeRequest], settings: ProbeSettings,
                 keep_layers: Sequence[int] = (), edit: tuple[Intervention, int] | None = None,
                 desc: str = "cloze", groups: Sequence[str] | None = None,
                 readout: Readout | None = None,
                 ) -> tuple[np.ndarray, dict[int, np.ndarray], int, int]:
    """Summed log-likelihoods [N, L+1, K] float64 (-inf padded), kept context residuals and the
    real / computed token counts; ``edit`` as in :func:`cloze_batch`. Contexts of one of
    ``groups`` share their exemplar prefix: it runs once per group with
    ``settings.prefix_reuse`` (never under an ``edit``, which changes it); every layer is read
    through ``readout`` (default: the logit lens)."""
    lens, max_rows = cloze_readout(loaded.adapter, readout)
    n, k = len(requests), max(r.n_options for r in requests)
    loglik = np.full((n, loaded.adapter.num_blocks + 1, k), -np.inf)
    kept: dict[int, np.ndarray] = {}
    tokens = [0, 0]  # real, computed

    def count_prefix(prefix: SharedPrefix) -> None:
        tokens[0] += prefix.length
        tokens[1] += prefix.length

    # an example's longest sequence: sorts by context length, budgets like the letter probe
    widest = [max(map(len, r.continuations)) for r in requests]
    with tqdm(total=n, desc=f"{desc} {loaded.name}", unit="ex",
              disable=not settings.progress) as bar:
        def run(idx: np.ndarray, current: ProbeSettings, prefix) -> BatchOutput:
            return cloze_batch(loaded, lens, [requests[i] for i in idx], current, max_rows, edit,
                               prefix)

        for idx, out in grouped_batches(loaded, [r.context_ids for r in requests],
                                        None if edit is not None else groups, settings, run,
                                        extra=widest, gapped=True, on_prefix=count_prefix):
            rows = out.loglik.numpy()
            at = 0
            for i in idx:
                kk = requests[i].n_options
                loglik[i, :, :kk] = rows[at:at + kk].T
                at += kk
            for layer in keep_layers:
                kept.setdefault(layer, np.empty((n, out.context_last.shape[-1]), np.float32))
                kept[layer][idx] = out.context_last[:, layer].float().cpu().numpy()
            tokens[0] += out.real_tokens
            tokens[1] += out.computed_tokens
            bar.update(len(idx))
    return loglik, kept, tokens[0], tokens[1]


def run_cloze(loaded: LoadedModel, requests: Sequence[ClozeRequest], labels: np.ndarray,
              settings: ProbeSettings | None = None, norm: str = "none",
              keep_layers: Sequence[int] = (), groups: Sequence[str] | None = None,
              readout: Readout | None = None) -> ProbeResult:
    """Read every option's (normalized) log-likelihood at every layer: a :class:`ProbeResult`.

    ``option_logits`` [N, L+1, K] float64 holds the normalized log-likelihoods (-inf where an
    example has fewer options), ``probs`` their float64 softmax over the options; ``residuals``
    are the last context position's (shared by all options) at ``keep_layers`` (default:
    ``settings.keep_layers``). Contexts of one of ``groups`` (``prompt_set.groups``) share their
    exemplar prefix, run once per group with ``settings.prefix_reuse``.
    """
    settings = settings or ProbeSettings()
    if not requests or len(labels) != len(requests):
        raise ValueError(f"{len(requests)} cloze requests and {len(labels)} labels; "
                         "need one label per request, at least one")
    divisors = cloze_divisors(requests, norm)  # validated before any compute
    keep = tuple(keep_layers) or tuple(settings.keep_layers)
    loglik, kept, real, computed = cloze_loglik(loaded, requests, settings, keep, groups=groups,
                                                readout=readout)
    scores = loglik / divisors[:, None, :]
    return ProbeResult(scores, option_probabilities(scores), np.asarray(labels).copy(), None, kept,
                       real, computed)


def run_cloze_steered(loaded: LoadedModel, requests: Sequence[ClozeRequest],
                      intervention: Intervention, settings: ProbeSettings | None = None,
                      norm: str = "none", use_cache: bool = True,
                      groups: Sequence[str] | None = None,
                      readout: Readout | None = None) -> np.ndarray:
    """Normalized option log-likelihoods [V, N, L+1, K] under each variant (eta) of ``intervention``.

    The edit applies to the context (its last position, or every context position with
    ``position: all``); every option's continuation then reads the edited context. An edit of
    the last position runs the context once and each variant only above the edit
    (:mod:`calibrate.engine.cloze_steer`); otherwise (or ``use_cache=False``) each variant is
    one full cloze pass. ``groups`` as in :func:`run_cloze` (the cached path only: an edit of
    every position changes the shared prefix too).
    """
    settings = settings or ProbeSettings()
    divisors = cloze_divisors(requests, norm)
    if use_cache and intervention.position == "last":
        from calibrate.engine.cloze_steer import cloze_loglik_steered

        loglik = cloze_loglik_steered(loaded, requests, intervention, settings, groups=groups,
                                      readout=readout)
        return loglik / divisors[None, :, None, :]
    out = [cloze_loglik(loaded, requests, settings, (), (intervention, v),
                        f"{type(intervention).__name__.lower()} {v + 1}/{intervention.n_variants}",
                        readout=readout)[0]
           for v in range(intervention.n_variants)]
    return np.stack(out) / divisors[None, :, None, :]
