"""Cloze scoring with MLP neurons mean-ablated at the positions that score the continuations.

**Where the ablation lands.** With one answer token per option the only scored prediction is
the last prompt position's, and that is where :mod:`calibrate.engine.neuron_ablation` ablates.
A cloze option is scored by every prediction of its continuation: token 0 by the context's last
position, token p ≥ 1 by continuation position p − 1. So here a neuron is ablated at exactly
those positions, each option's *tail* (the context's last token, then the continuation without
its last token): activation ``a → a + s·(μ − a)`` at every tail position, in the row of that
option; the context's other positions (and the key/value cache they leave) are unchanged, as in
the letters case. An option's continuation tokens then also attend to ablated earlier tail
positions, as they would in a forward pass with the hook.

**The mean** μ: over the calibration split, over every *scored term*, i.e. one entry per
continuation token of every option, taken at the position that predicts it (the context's last
position counts once per option, as it scores each option's first token). The pass keeps, per
example, the mean and mean square of the activations over its terms and their number, so the
pooled mean and standard deviation over terms are exact (:meth:`NeuronPass.pooled_mean`).

**Cheap.** The tails run once, unedited, through every block after the context's cache (as
cloze steering does, :mod:`calibrate.engine.cloze_steer`), keeping every layer's state and the
chosen blocks' activations at every tail position. An arm whose lowest block is the last
changes the last layer's state at each tail position by a known vector ``Δ_L`` (that
position's own activations): no forward pass; an arm whose lowest block b is lower runs only
the blocks above b on the tails, from ``x_b + Δ_b``, its higher neurons replaced by a hook.
The **direct effect** reads ``x_ℓ + Σ_{blocks ≤ ℓ} Δ`` at every tail position through the
final norm with its scale held at that of ``x_ℓ`` and the full-vocabulary log-softmax.
Log-likelihoods are summed per option and divided as the job's ``cloze_norm`` divides them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from calibrate.core.option_scores import option_probabilities
from calibrate.engine.cloze import cloze_readout, lens_logprobs
from calibrate.engine.cloze_steer import _Tails
from calibrate.engine.neuron_ablation import (
    NeuronAblationError,
    NeuronArms,
    NeuronPass,
    direct_readable,
    replace_activations,
    residual_changes,
)
from calibrate.engine.neuron_logits import LastBlockLogits
from calibrate.engine.prefix import SharedPrefix, grouped_batches
from calibrate.engine.probe import ProbeResult, ProbeSettings, check_finite
from calibrate.engine.readout import Readout
from calibrate.engine.steer import variants_per_pass
from calibrate.engine.upper import capture_upper, only_blocks_from
from calibrate.model.adapters import Adapter, final_norm_affine, mlp_parts
from calibrate.model.load import LoadedModel
from calibrate.tasks.continuations import ClozeRequest, cloze_divisors
from calibrate.tasks.prompts import PromptSet


@contextmanager
def capture_sequences(adapter: Adapter, blocks: Sequence[int]
                      ) -> Iterator[dict[str, dict[int, torch.Tensor]]]:
    """Keep each block's MLP activations (and the MLP's output where a post-MLP norm follows)
    of one pass at every position, as given ([R, W, d] or flattened [R*W, d]); hooks removed in
    ``finally``."""
    store: dict[str, dict[int, torch.Tensor]] = {"activations": {}, "outputs": {}}
    handles = []
    try:
        for b in blocks:
            parts = mlp_parts(adapter, b)

            def pre(_m, args, kwargs, b=b):
                store["activations"][b] = (args[0] if args else kwargs["input"]).detach().float()

            handles.append(parts.down.register_forward_pre_hook(pre, with_kwargs=True))
            if parts.post_norm is not None:
                def post(_m, _args, output, b=b):
                    store["outputs"][b] = output.detach().float()

                handles.append(parts.mlp.register_forward_hook(post))
        yield store
    finally:
        for handle in handles:
            handle.remove()


class _NeuronTails(_Tails):
    """:class:`calibrate.engine.cloze_steer._Tails` that also keeps the chosen blocks' MLP
    activations [R, W, d_mlp] (and post-MLP-norm inputs [R, W, H]) at every tail position of
    the unedited run."""

    def __init__(self, loaded: LoadedModel, batch: Sequence[ClozeRequest],
                 settings: ProbeSettings, prefix: SharedPrefix | None, blocks: Sequence[int]
                 ) -> None:
        self._blocks, self._record = list(blocks), True
        self._pieces: list[tuple[torch.Tensor, dict]] = []
        super().__init__(loaded, batch, settings, prefix)
        self._record = False
        rows_total = len(self.conts)
        self.activations: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        for rows, store in self._pieces:
            for kind, dest in (("activations", self.activations), ("outputs", self.outputs)):
                for b, x in store[kind].items():
                    x = x.reshape(len(rows), -1, x.shape[-1])
                    if b not in dest:
                        dest[b] = x.new_zeros((rows_total, self.width, x.shape[-1]))
                    dest[b][rows.to(x.device), :x.shape[1]] = x
        del self._pieces

    def _run(self, loaded: LoadedModel, rows: torch.Tensor, ids: torch.Tensor, start: int) -> None:
        if not self._record:
            return super()._run(loaded, rows, ids, start)
        with capture_sequences(loaded.adapter, self._blocks) as store:
            super()._run(loaded, rows, ids, start)
        self._pieces.append((rows, store))
        return None


def _frozen_logprobs(lens: Readout, affine, states: torch.Tensor, deltas: torch.Tensor,
                     token_state: torch.Tensor, token_target: torch.Tensor, max_rows: int
                     ) -> torch.Tensor:
    """Full-vocabulary log-probabilities [M, n] of each token when the states [S, n, H] change
    by ``deltas`` [S, n, H] with the final norm's scale held at that of ``states``."""
    n_layers = states.shape[1]
    step = max(1, max_rows // n_layers)
    token_state, token_target = token_state.to(lens.device), token_target.to(lens.device)
    out = torch.empty((len(token_state), n_layers), dtype=torch.float64, device=lens.device)
    for start in range(0, states.shape[0], step):
        x = states[start:start + step].to(lens.device, torch.float32)
        normed = lens.normalize(x) + affine.held_scale_shift(
            x, deltas[start:start + step].to(lens.device))
        lse = lens.vocab_logsumexp(normed)
        sel = ((token_state >= start) & (token_state < start + step)).nonzero().squeeze(1)
        local = token_state[sel] - start
        target = lens.option_logits(normed[local], token_target[sel, None])[..., 0]
        out[sel] = target.double() - lse[local]
    return out


@dataclass
class ClozeFinal:
    """One batch's distinct scoring states at the last layer and the terms they score: what a
    later edit of the last layer (e.g. ĉ's component) needs, no forward pass."""

    states: np.ndarray  # [S, H] float32
    token_state: np.ndarray  # [M]
    token_target: np.ndarray  # [M]
    token_example: np.ndarray  # [M] index into the pass's prompt set
    token_option: np.ndarray  # [M]


@dataclass
class _Batch:
    loglik: torch.Tensor  # [R, L+1]
    context_last: torch.Tensor  # [B, L+1, H]
    act_mean: dict[int, torch.Tensor]  # block -> [B, d] mean over the example's scored terms
    act_sq: dict[int, torch.Tensor]
    terms: torch.Tensor  # [B]
    total: torch.Tensor | None  # [A, R, L+1-first]
    direct: torch.Tensor | None
    final: ClozeFinal
    real: int


def _batch(loaded: LoadedModel, lens: Readout, max_rows: int, batch: Sequence[ClozeRequest],
           settings: ProbeSettings, prefix: SharedPrefix | None, blocks: Sequence[int],
           arms: NeuronArms | None, direct: bool, arm_chunk: int, budget: int,
           reader: LastBlockLogits | None = None) -> _Batch:
    last = loaded.adapter.num_blocks
    tails = _NeuronTails(loaded, batch, settings, prefix, blocks)
    plan, n_rows = tails.plan, len(tails.conts)
    src = plan.state_src.to(tails.states.device)
    token_row = plan.token_row.to(lens.device)

    def summed(lp: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((n_rows, lp.shape[1]), dtype=torch.float64, device=lens.device)
        return out.index_add_(0, token_row, lp).cpu()

    base = summed(lens_logprobs(lens, tails.sources(tails.states)[src], plan.token_state,
                                plan.token_target, max_rows))
    # every scored term: tail position p of row r, p < the row's continuation length
    mask = tails.tail_mask.to(tails.states.device).float()  # [R, W]
    example = tails.row_example.to(mask.device)
    terms = torch.zeros(len(batch), device=mask.device).index_add_(0, example, mask.sum(1))
    act_mean, act_sq = {}, {}
    for b in blocks:
        a = tails.activations[b].to(mask.device) * mask[..., None]
        s1 = torch.zeros((len(batch), a.shape[-1]), device=a.device).index_add_(0, example, a.sum(1))
        s2 = torch.zeros_like(s1).index_add_(0, example, (a * a).sum(1))
        act_mean[b], act_sq[b] = (s1 / terms[:, None]).cpu(), (s2 / terms[:, None]).cpu()
    finals = tails.sources(tails.states[:, :, last])[src]  # [S, H]
    ex_of_row = tails.row_example[plan.token_row]
    opt_of_row = plan.token_row - tails.first_rows[ex_of_row]
    final = ClozeFinal(finals.float().cpu().numpy(), plan.token_state.numpy(),
                       plan.token_target.numpy(), ex_of_row.numpy(), opt_of_row.numpy())
    total = direct_out = None
    if arms is not None:
        total, direct_out = _arms(loaded, lens, max_rows, tails, arms, direct, arm_chunk, budget,
                                  base, summed, reader)
    context_last = tails.states[tails.first_rows, 0]
    return _Batch(base, context_last, act_mean, act_sq, terms.cpu(), total, direct_out, final,
                  int(tails.tail_mask.sum()))


def _arms(loaded: LoadedModel, lens: Readout, max_rows: int, tails: _NeuronTails,
          arms: NeuronArms, direct: bool, arm_chunk: int, budget: int, base: torch.Tensor,
          summed: Callable[[torch.Tensor], torch.Tensor], reader: LastBlockLogits | None
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Total and direct log-likelihoods [A, R, L+1-first] of every arm for one batch
    (``reader``: the last block's arms read in logit space)."""
    adapter, last = loaded.adapter, loaded.adapter.num_blocks
    first = min(arms.blocks)
    plan, n_rows, width = tails.plan, len(tails.conts), tails.width
    src = plan.state_src.to(tails.states.device)
    weights = {b: mlp_parts(adapter, b).out_weight.detach().float() for b in arms.blocks}
    flat_acts = {b: a.reshape(n_rows * width, -1) for b, a in tails.activations.items()}
    flat_outs = {b: o.reshape(n_rows * width, -1) for b, o in tails.outputs.items()}
    total = base[None, :, first:].repeat(arms.n_arms, 1, 1)
    direct_out = total.clone() if direct else None
    affine = final_norm_affine(adapter) if direct else None
    done = np.zeros(arms.n_arms, dtype=bool)
    if reader is not None:  # the last block's arms, in logit space
        def at_states(t: torch.Tensor) -> torch.Tensor:
            return tails.sources(t)[src]

        outs = tails.outputs.get(last)
        tot, frozen = reader.read(at_states(tails.states[:, :, last]),
                                  at_states(tails.activations[last]),
                                  None if outs is None else at_states(outs), plan.token_state,
                                  plan.token_target, direct)
        for j, arm in enumerate(reader.arm_ids):
            total[arm, :, -1] = summed(tot[j][:, None])[:, 0]
            if direct:
                direct_out[arm, :, -1] = summed(frozen[j][:, None])[:, 0]
        done[reader.arm_ids] = True
    for lo in range(0, arms.n_arms, arm_chunk):
        arm_ids = np.arange(lo, min(lo + arm_chunk, arms.n_arms))
        arm_ids = arm_ids[~done[arm_ids]]
        if not len(arm_ids):
            continue
        deltas = {b: d.reshape(len(arm_ids), n_rows, width, -1) for b, d in residual_changes(
            adapter, arms, arm_ids, flat_acts, flat_outs, weights).items()}  # [A', R, W, H]
        for j, arm in enumerate(arm_ids):  # deltas are indexed by position in arm_ids
            if direct:
                x = tails.states[:, :, first:].float()  # [R, W, n, H]
                stack = torch.zeros_like(x)
                for b, d in deltas.items():
                    stack[:, :, b - first:] += d[j].to(x.device)[:, :, None]
                lp = _frozen_logprobs(lens, affine, tails.sources(x)[src],
                                      tails.sources(stack)[src], plan.token_state,
                                      plan.token_target, max_rows)
                direct_out[arm] = summed(lp)
        for start in sorted(set(arms.lowest[arm_ids].tolist())):
            group = arm_ids[arms.lowest[arm_ids] == start]
            local = torch.as_tensor(np.searchsorted(arm_ids, group))
            if start == last:  # no block above: the last layer's states move by Δ_L
                for j, arm in zip(local.tolist(), group.tolist()):
                    moved = tails.states[:, :, last].float() + deltas[last][j].to(tails.states.device)
                    lp = lens_logprobs(lens, tails.sources(moved[:, :, None])[src],
                                       plan.token_state, plan.token_target, max_rows, last)
                    total[arm, :, -1] = summed(lp)[:, 0]
                continue
            above = [b for b in arms.blocks if b > start]
            step = variants_per_pass(n_rows, tails.ctx_mask.shape[1] + width, last - start, budget)
            for g0 in range(0, len(group), step):
                sub, sub_local = group[g0:g0 + step], local[g0:g0 + step]
                upper = _upper(loaded, tails, arms, sub, deltas[start][sub_local], start, above)
                for j, arm in enumerate(sub.tolist()):
                    check_finite(upper[j].flatten(0, 1))
                    lp = lens_logprobs(lens, tails.sources(upper[j])[src], plan.token_state,
                                       plan.token_target, max_rows, start)
                    total[arm, :, start - first:] = summed(lp)
    return total, direct_out


def _upper(loaded: LoadedModel, tails: _NeuronTails, arms: NeuronArms, sub: np.ndarray,
           delta: torch.Tensor, start: int, above: Sequence[int]) -> torch.Tensor:
    """Tail states [A', R, W, L+1-start, H] of arms ``sub`` whose state at layer ``start`` is
    the unedited one plus ``delta`` [A', R, W, H], their neurons above replaced by a hook."""
    adapter = loaded.adapter
    n_arm, n_rows = len(sub), len(tails.conts)
    states = tails.states
    out = states.new_zeros((n_arm, n_rows, tails.width, adapter.num_blocks + 1 - start,
                            states.shape[-1]))
    for group in tails.groups:
        width = max(tails.widths[r] for r in group.tolist())
        rows = group.repeat(n_arm)  # arm-major: arm i's rows of this group
        arm_local = torch.arange(n_arm).repeat_interleave(len(group))
        dev_rows = rows.to(states.device)
        injected = (states[dev_rows, :width, start].float()
                    + delta[arm_local.to(delta.device), rows.to(delta.device), :width]
                    .to(states.device)).to(states.dtype).to(loaded.device)
        row_arms = torch.as_tensor(sub)[arm_local]
        with only_blocks_from(adapter, start, injected), \
                replace_activations(adapter, arms, above, row_arms), \
                capture_upper(adapter, start, slice(None)) as store:
            tails._run(loaded, rows, tails.ids[rows.to(tails.ids.device), :width], start)
        stacked = torch.stack([injected, *store], dim=2).to(out.device)  # [r, width, n, H]
        out[arm_local.to(out.device), dev_rows.to(out.device), :width] = stacked
    return out


def cloze_neuron_pass(loaded: LoadedModel, prompt_set: PromptSet, blocks: Sequence[int],
                      settings: ProbeSettings, readout: Readout | None = None,
                      keep: Sequence[int] = (), arms: NeuronArms | None = None,
                      direct: bool = True, arm_chunk: int = 64) -> NeuronPass:
    """:func:`calibrate.engine.neuron_ablation.neuron_pass` for cloze prompts: the probe (each
    option's normalized log-likelihood at every layer, the context's last residuals at ``keep``),
    the activations' per-example mean and mean square over the scored terms and, with ``arms``,
    every arm's total and direct normalized log-likelihoods [A, N, L+1-first, K] (-inf where an
    example has fewer options). The readout must read the whole vocabulary."""
    requests = prompt_set.requests
    if not requests:
        raise NeuronAblationError("no cloze prompts to run: the prompt set is empty")
    lens, max_rows = cloze_readout(loaded.adapter, readout)
    direct = direct and arms is not None and direct_readable(lens)
    divisors = cloze_divisors(requests, prompt_set.cloze_norm or "none")
    n = len(requests)
    # the prompt set's option width (a subset may have fewer options than the whole set)
    k = max([r.n_options for r in requests]
            + [np.shape(getattr(prompt_set, "option_ids", np.zeros((0, 0))))[-1]])
    divisors = np.pad(divisors, ((0, 0), (0, k - divisors.shape[1])), constant_values=1.0)
    last = loaded.adapter.num_blocks
    blocks = sorted(int(b) for b in blocks)
    first = min(blocks)
    if arms is not None and tuple(arms.blocks) != tuple(blocks):
        raise ValueError(f"arms over blocks {arms.blocks}, pass over {blocks}")
    loglik = np.full((n, last + 1, k), -np.inf)
    keep = sorted({*keep, *settings.keep_layers})
    kept: dict[int, np.ndarray] = {}
    widths = {b: mlp_parts(loaded.adapter, b).width for b in blocks}
    acts = {b: np.empty((n, w), np.float32) for b, w in widths.items()}
    squares = {b: np.empty((n, w), np.float32) for b, w in widths.items()}
    terms = np.empty(n, dtype=np.float64)
    n_arms = 0 if arms is None else arms.n_arms
    total = np.full((n_arms, n, last + 1 - first, k), -np.inf) if arms is not None else None
    direct_out = np.full_like(total, -np.inf) if direct else None
    finals: list[ClozeFinal] = []
    reader = None
    if arms is not None and direct_readable(lens) and np.any(arms.lowest == last):
        with torch.inference_mode():
            reader = LastBlockLogits(loaded, lens, arms)
    tokens = [0]
    budget = settings.max_tokens * loaded.adapter.num_blocks
    widest = [max(map(len, r.continuations)) for r in requests]

    def run(idx: np.ndarray, current: ProbeSettings, prefix: SharedPrefix | None) -> _Batch:
        with torch.inference_mode():
            return _batch(loaded, lens, max_rows, [requests[i] for i in idx], current, prefix,
                          blocks, arms, direct, arm_chunk, budget, reader)

    with tqdm(total=n, desc=f"cloze neurons {loaded.name}" + (f" x{n_arms}" if arms else ""),
              unit="ex", disable=not settings.progress) as bar:
        for idx, out in grouped_batches(loaded, [r.context_ids for r in requests],
                                        prompt_set.groups, settings, run, extra=widest,
                                        gapped=True, on_prefix=lambda p: None):
            at = 0
            rows_of = []
            for i in idx:
                kk = requests[i].n_options
                rows_of.append((i, at, kk))
                loglik[i, :, :kk] = out.loglik[at:at + kk].numpy().T
                at += kk
            for (i, at, kk) in rows_of:
                if total is not None:
                    total[:, i, :, :kk] = out.total[:, at:at + kk].numpy().transpose(0, 2, 1)
                if direct_out is not None:
                    direct_out[:, i, :, :kk] = out.direct[:, at:at + kk].numpy().transpose(0, 2, 1)
            for layer in keep:
                kept.setdefault(layer, np.empty((n, out.context_last.shape[-1]), np.float32))
                kept[layer][idx] = out.context_last[:, layer].float().cpu().numpy()
            for b in blocks:
                acts[b][idx], squares[b][idx] = out.act_mean[b].numpy(), out.act_sq[b].numpy()
            terms[idx] = out.terms.numpy()
            out.final.token_example = np.asarray(idx)[out.final.token_example]
            finals.append(out.final)
            tokens[0] += out.real
            bar.update(len(idx))
    scores = loglik / divisors[:, None, :]
    if total is not None:
        total = total / divisors[None, :, None, :]
    if direct_out is not None:
        direct_out = direct_out / divisors[None, :, None, :]
    result = ProbeResult(scores, option_probabilities(scores), prompt_set.labels.copy(), None,
                         kept, tokens[0], tokens[0])
    return NeuronPass(result, acts, first, total, direct_out, terms=terms, squares=squares,
                      finals=finals, divisors=divisors)


def cloze_final_edits(loaded: LoadedModel, neuron_pass: NeuronPass, deltas: Callable[
        [np.ndarray], np.ndarray], readout: Readout | None = None, direct: bool = True
        ) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalized log-likelihoods [A, N, K] at the last layer when every scoring state x
    (``neuron_pass.finals``) moves by ``deltas(x)`` [A, S, H]: read as the model reads it and,
    where the readout allows, with the final norm's scale held at that of x (None otherwise).
    No forward pass."""
    lens, max_rows = cloze_readout(loaded.adapter, readout)
    direct = direct and direct_readable(lens)
    last = loaded.adapter.num_blocks
    n, k = neuron_pass.result.option_logits.shape[0], neuron_pass.result.option_logits.shape[2]
    affine = final_norm_affine(loaded.adapter) if direct else None
    total = frozen = None
    with torch.inference_mode():
        for fin in neuron_pass.finals:
            x = torch.as_tensor(fin.states, dtype=torch.float32)
            d = torch.as_tensor(np.asarray(deltas(fin.states)), dtype=torch.float32)
            if total is None:
                total = np.zeros((len(d), n, k))
                frozen = np.zeros_like(total) if direct else None
            ts, tt = torch.as_tensor(fin.token_state), torch.as_tensor(fin.token_target)
            for a in range(len(d)):
                lp = lens_logprobs(lens, (x + d[a])[:, None], ts, tt, max_rows, last)[:, 0]
                np.add.at(total[a], (fin.token_example, fin.token_option), lp.cpu().numpy())
                if direct:
                    lp = _frozen_logprobs(lens, affine, x[:, None], d[a][:, None], ts, tt,
                                          max_rows)[:, 0]
                    np.add.at(frozen[a], (fin.token_example, fin.token_option), lp.cpu().numpy())
    pad = ~np.isfinite(neuron_pass.result.option_logits[:, -1])  # [N, K] missing options
    out = []
    for arr in (total, frozen):
        if arr is None:
            out.append(None)
            continue
        arr = arr / neuron_pass.divisors[None]
        arr[:, pad] = -np.inf
        out.append(arr)
    return out[0], out[1]


def final_term_mean(neuron_pass: NeuronPass, vector: np.ndarray) -> float:
    """The mean of ``x · vector`` over every scored term's last-layer state x (the mean a
    mean-ablation along ``vector`` at the scoring positions uses)."""
    total, count = 0.0, 0
    for fin in neuron_pass.finals:
        proj = fin.states.astype(np.float64) @ np.asarray(vector, dtype=np.float64)
        total += float(proj[fin.token_state].sum())
        count += len(fin.token_state)
    return total / count
