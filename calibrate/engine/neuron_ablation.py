"""MLP neurons at the last prompt position: capture their activations, mean-ablate them, read
the total and the direct effect at every layer from the edited block up.

One pass per batch of prompts, as the steering passes run (:mod:`calibrate.engine.upper`): the
context without its last token runs once (its key/value cache kept), then the last token runs
with hooks that keep every layer's residual and the activations (the input of the MLP's output
projection) of the chosen blocks, at that position; the layers are read through the job's
readout, so this pass is also the job's probe.

An arm ablates some neurons: activation ``a`` → ``a + s·(μ − a)`` (μ: the calibration split's
mean at the last position; ``s = 1`` is mean-ablation, another ``s`` scales the change, as the
matched-norm random neurons need). Its effect on the residual after its lowest block b is a
known vector, ``Δ_b = Σ s_i (μ_i − a_i) w_i`` (through the post-MLP norm where the block has one:
``post(m + δ) − post(m)``, m the MLP's output), so

* an arm whose lowest block is the last needs no forward pass: the last layer is read at
  ``x_L + Δ_L``;
* an arm whose lowest block is below the last runs only the blocks above b for the last position
  on the cache, from ``x_b + Δ_b``, with a hook on each higher block of the arm that replaces its
  neurons' activations (what a full forward pass with that hook computes; the other positions
  and the layers below b are unchanged).

The **direct effect** at layer ℓ ≥ b reads ``x_ℓ + Σ_{blocks ≤ ℓ} Δ`` (the unablated
activations' Δ, no block in between) through the final norm with its scale held at that of
``x_ℓ`` (:class:`calibrate.model.adapters.NormAffine`) and the unembedding: the difference of
the total and the direct effect at the last layer is the effect mediated by the final norm's
scale, which Stolfo et al. attribute to the null space. Every hook is removed in ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from calibrate.engine.context import suffix_contexts, whole_contexts
from calibrate.engine.lens import LogitLens
from calibrate.engine.probe import (
    ProbeResult,
    ProbeSettings,
    _lens_batch,
    check_finite,
    left_pad,
    tokenize,
)
from calibrate.engine.readout import Readout
from calibrate.engine.steer import variants_per_pass
from calibrate.engine.upper import last_states, upper_forward
from calibrate.errors import UserError
from calibrate.model.adapters import (
    Adapter,
    MLPParts,
    final_norm_affine,
    mlp_parts,
    norm_affine,
)
from calibrate.model.load import LoadedModel
from calibrate.tasks.prompts import PromptSet


class NeuronAblationError(UserError):
    """The prompts cannot be run neuron by neuron (e.g. one-token prompts)."""


def output_weights(adapter: Adapter, block: int) -> torch.Tensor:
    """[d_mlp, hidden] float32: what each neuron of ``block`` writes into the residual per unit
    of activation, through the gain of the post-MLP norm where the block has one (Gemma-2/3;
    the norm's division by the RMS of the MLP output, which depends on the token, is left out)."""
    parts = mlp_parts(adapter, block)
    weight = parts.out_weight.detach().float().cpu()
    if parts.post_norm is not None:
        weight = weight * norm_affine(adapter.model_type, parts.post_norm).gain.cpu()[None]
    return weight


def direct_readable(readout: Readout) -> bool:
    """Whether ``readout`` reads the final norm's output as the logit lens does (its state is the
    normed residual), so a read with the norm's scale held fixed is defined."""
    return isinstance(readout, LogitLens) and type(readout).prepare is LogitLens.prepare


@dataclass
class NeuronArms:
    """Ablation arms over the chosen blocks. Arm a changes, in each block b, the neurons
    ``idx[b][a]`` by the scales ``scale[b][a]`` (padded with scale 0); ``dense[b]`` [A, d_mlp]
    holds the same scales densely (the hooks read it)."""

    blocks: tuple[int, ...]
    means: dict[int, np.ndarray]  # block -> [d_mlp] the calibration mean activation
    idx: dict[int, np.ndarray] = field(default_factory=dict)  # block -> [A, n_b] int64
    scale: dict[int, np.ndarray] = field(default_factory=dict)  # block -> [A, n_b] float32
    dense: dict[int, np.ndarray] = field(default_factory=dict)  # block -> [A, d_mlp] float32
    lowest: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # [A]

    @classmethod
    def build(cls, blocks: Sequence[int], means: dict[int, np.ndarray],
              arms: Sequence[Sequence[tuple[int, int, float]]]) -> NeuronArms:
        """Arms from lists of (block, neuron, scale); every arm changes at least one neuron."""
        blocks = tuple(int(b) for b in blocks)
        out = cls(blocks, {b: np.asarray(means[b], dtype=np.float32) for b in blocks})
        lowest = []
        for arm in arms:
            if not arm:
                raise ValueError("an arm with no neuron")
            bad = sorted({b for b, _, _ in arm if b not in blocks})
            if bad:
                raise ValueError(f"arm neurons in blocks {bad}, outside the captured {blocks}")
            lowest.append(min(b for b, _, _ in arm))
        out.lowest = np.array(lowest, dtype=np.int64)
        for b in blocks:
            width = len(out.means[b])
            per_arm = [[(n, s) for bb, n, s in arm if bb == b] for arm in arms]
            size = max(1, max(len(p) for p in per_arm))
            idx = np.zeros((len(arms), size), dtype=np.int64)
            scale = np.zeros((len(arms), size), dtype=np.float32)
            dense = np.zeros((len(arms), width), dtype=np.float32)
            for a, pairs in enumerate(per_arm):
                seen = [n for n, _ in pairs]
                if len(set(seen)) != len(seen):
                    raise ValueError(f"arm {a} lists a neuron of block {b} twice")
                for j, (n, s) in enumerate(pairs):
                    idx[a, j], scale[a, j], dense[a, n] = n, s, s
            out.idx[b], out.scale[b], out.dense[b] = idx, scale, dense
        return out

    @property
    def n_arms(self) -> int:
        return len(self.lowest)


@contextmanager
def capture_mlps(adapter: Adapter, blocks: Sequence[int]) -> Iterator[dict[str, dict[int, torch.Tensor]]]:
    """Keep each block's MLP activations [B, d_mlp] (and, where a post-MLP norm follows, the
    MLP's output [B, hidden]) of a pass that runs ONE position per row (the last token after its
    cache); hooks removed in ``finally``."""
    store: dict[str, dict[int, torch.Tensor]] = {"activations": {}, "outputs": {}}
    handles = []

    def rows(x: torch.Tensor) -> torch.Tensor:
        return (x[:, -1] if x.ndim == 3 else x).detach().float().clone()

    try:
        for b in blocks:
            parts = mlp_parts(adapter, b)

            def pre(_m, args, kwargs, b=b):
                store["activations"][b] = rows(args[0] if args else kwargs["input"])

            handles.append(parts.down.register_forward_pre_hook(pre, with_kwargs=True))
            if parts.post_norm is not None:
                def post(_m, _args, output, b=b):
                    store["outputs"][b] = rows(output)

                handles.append(parts.mlp.register_forward_hook(post))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replace_activations(adapter: Adapter, arms: NeuronArms, blocks: Sequence[int],
                        row_arms: torch.Tensor) -> Iterator[None]:
    """During a one-position pass whose row r is arm ``row_arms[r]``: in each of ``blocks`` set
    ``a ← a + s·(μ − a)`` for the arm's neurons (hooks on the output projections' inputs)."""
    handles = []

    def make(b: int, parts: MLPParts):
        def pre(_m, args, kwargs):
            x = args[0] if args else kwargs["input"]
            s = torch.as_tensor(arms.dense[b], device=x.device)[row_arms.to(x.device)]
            mu = torch.as_tensor(arms.means[b], device=x.device)
            shape = x.shape
            flat = x.reshape(len(row_arms), -1, shape[-1])  # one position per row
            new = (flat + s[:, None].to(flat.dtype) * (mu.to(flat.dtype) - flat)).reshape(shape)
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "input": new}
        return pre

    try:
        for b in blocks:
            parts = mlp_parts(adapter, b)
            handles.append(parts.down.register_forward_pre_hook(make(b, parts), with_kwargs=True,
                                                                prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def residual_changes(adapter: Adapter, arms: NeuronArms, arm_ids: np.ndarray,
                     activations: dict[int, torch.Tensor], outputs: dict[int, torch.Tensor],
                     weights: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per block b: Δ_b [A', B, H] (float32), the change of the residual after block b when the
    arms ``arm_ids`` change their neurons of block b and nothing below it changed (the block's
    own activations, ``activations[b]`` [B, d_mlp]; ``weights[b]`` [d_mlp, H] the raw output
    weights)."""
    out = {}
    for b in arms.blocks:
        a = activations[b]
        idx = torch.as_tensor(arms.idx[b][arm_ids], device=a.device)  # [A', n]
        sc = torch.as_tensor(arms.scale[b][arm_ids], device=a.device)
        mu = torch.as_tensor(arms.means[b], device=a.device)
        change = (mu[idx][:, None, :] - a[:, idx].permute(1, 0, 2)) * sc[:, None, :]  # [A', B, n]
        delta = torch.einsum("abn,anh->abh", change, weights[b].to(a.device)[idx])
        parts = mlp_parts(adapter, b)
        if parts.post_norm is not None:
            m = outputs[b][None].expand_as(delta)
            with torch.inference_mode():
                delta = parts.post_norm(m + delta).float() - parts.post_norm(m).float()
        out[b] = delta
    return out


@dataclass
class NeuronPass:
    """The examples of one pass (in the prompt set's order): the unablated result (the probe),
    the captured activations and, with arms, their option logits at layers ``first..L``
    (``total``: the arm's forward effect; ``direct``: with the final norm's scale held fixed;
    None where the readout cannot read it)."""

    result: ProbeResult
    activations: dict[int, np.ndarray]  # block -> [N, d_mlp] float32
    first: int = 0  # the lowest captured block: layers first..L are in total/direct
    total: np.ndarray | None = None  # [A, N, L+1-first, K]
    direct: np.ndarray | None = None
    # cloze (:mod:`calibrate.engine.cloze_neurons`): ``activations`` is each example's mean over
    # its scored terms, ``squares`` the mean square, ``terms`` their number; ``finals`` the
    # last layer's scoring states, ``divisors`` [N, K] the cloze normalization
    terms: np.ndarray | None = None  # [N]; None: one position per example
    squares: dict[int, np.ndarray] | None = None
    finals: list | None = None
    divisors: np.ndarray | None = None

    def pooled_mean(self) -> dict[int, np.ndarray]:
        """Per block [d_mlp] float64: the mean activation over every ablated position of the
        pass (letters: the examples' last positions; cloze: every scored term)."""
        w = np.ones(len(self.result.labels)) if self.terms is None else self.terms
        return {b: (a.astype(np.float64) * w[:, None]).sum(0) / w.sum()
                for b, a in self.activations.items()}

    def pooled_std(self) -> dict[int, np.ndarray]:
        """Per block [d_mlp]: the population standard deviation over the same positions."""
        w = np.ones(len(self.result.labels)) if self.terms is None else self.terms
        means = self.pooled_mean()
        out = {}
        for b, a in self.activations.items():
            sq = a.astype(np.float64) ** 2 if self.squares is None else \
                self.squares[b].astype(np.float64)
            out[b] = np.sqrt(np.maximum((sq * w[:, None]).sum(0) / w.sum() - means[b] ** 2, 0))
        return out


def _read_rows(lens: Readout, residual: torch.Tensor, layers: Sequence[int],
               option_ids: torch.Tensor) -> torch.Tensor:
    """Option logits [R, len(layers), K] of residuals [R, len(layers), H]."""
    check_finite(residual)
    return lens.read_layers(residual.to(lens.device), list(layers), option_ids)


def _direct(lens: LogitLens, affine, residuals: torch.Tensor, deltas: torch.Tensor,
            option_ids: torch.Tensor) -> torch.Tensor:
    """Frozen-scale reads: residuals [B, n, H] (layers first..L), deltas [A', B, n, H] ->
    option logits [A', B, n, K]."""
    x = residuals.to(lens.device, torch.float32)
    normed = lens.normalize(x)  # [B, n, H]
    a_count = deltas.shape[0]
    edited = normed[None] + affine.held_scale_shift(x, deltas.to(lens.device))
    flat = edited.reshape(a_count * x.shape[0], x.shape[1], x.shape[2])
    ids = option_ids.repeat(a_count, 1)
    return lens.option_logits(flat, ids).reshape(a_count, x.shape[0], x.shape[1], -1)


def _arm_batch(loaded: LoadedModel, lens: Readout, state, option_ids: torch.Tensor,
               arms: NeuronArms, weights: dict[int, torch.Tensor], activations, outputs,
               direct: bool, arm_chunk: int, token_budget: int
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Total and direct option logits [A, B, L+1-first, K] (CPU) of every arm for one batch."""
    adapter, last = loaded.adapter, loaded.adapter.num_blocks
    first = min(arms.blocks)
    layers = list(range(first, last + 1))
    n_ex = len(state.last_ids)
    residuals = state.residuals[:, first:].float()  # [B, n, H], model device
    affine = final_norm_affine(adapter) if direct else None
    base = _read_rows(lens, residuals, layers, option_ids).cpu()  # [B, n, K]
    total = base[None].repeat(arms.n_arms, 1, 1, 1)
    direct_out = base[None].repeat(arms.n_arms, 1, 1, 1) if direct else None
    for lo in range(0, arms.n_arms, arm_chunk):
        arm_ids = np.arange(lo, min(lo + arm_chunk, arms.n_arms))
        deltas = residual_changes(adapter, arms, arm_ids, activations, outputs, weights)
        if direct:
            # cumulative: at layer l every block <= l adds its own (unablated) change
            stack = residuals.new_zeros((len(arm_ids), *residuals.shape))
            for b, d in deltas.items():
                stack[:, :, b - first:] += d.to(stack.device)[:, :, None]
            direct_out[arm_ids] = _direct(lens, affine, residuals, stack, option_ids).cpu()
        for start in sorted(set(arms.lowest[arm_ids].tolist())):
            group = arm_ids[arms.lowest[arm_ids] == start]
            local = torch.as_tensor(group - lo)
            if start == last:  # no block above: read the last layer at x_L + Δ_L
                edited = residuals[None, :, -1] + deltas[last][local].to(residuals.device)
                flat = edited.reshape(-1, 1, edited.shape[-1])
                read = _read_rows(lens, flat, [last], option_ids.repeat(len(group), 1))
                total[group, :, -1] = read.reshape(len(group), n_ex, -1).cpu()
                continue
            above = [b for b in arms.blocks if b > start]
            step = variants_per_pass(n_ex, state.mask.shape[1], last - start, token_budget)
            for g0 in range(0, len(group), step):
                sub, sub_local = group[g0:g0 + step], local[g0:g0 + step]
                rows = torch.arange(n_ex).repeat(len(sub))  # arm-major: row = (arm, example)
                row_arms = torch.as_tensor(sub).repeat_interleave(n_ex)
                at = state.residuals[:, start].float()
                hidden = at[None] + deltas[start][sub_local].to(at.device)  # [A', B, H]
                hidden = hidden.reshape(-1, hidden.shape[-1]).to(state.residuals.dtype)
                with replace_activations(adapter, arms, above, row_arms):
                    upper = upper_forward(loaded, state, start, hidden, rows)
                read = _read_rows(lens, upper.float(), list(range(start, last + 1)),
                                  option_ids[rows])
                total[sub, :, start - first:] = read.reshape(len(sub), n_ex,
                                                             *read.shape[1:]).cpu()
    return total, direct_out


def neuron_pass(loaded: LoadedModel, prompt_set: PromptSet, blocks: Sequence[int],
                settings: ProbeSettings, readout: Readout | None = None,
                keep: Sequence[int] = (), arms: NeuronArms | None = None,
                direct: bool = True, arm_chunk: int = 64) -> NeuronPass:
    """Run every prompt once (context cached, last token with capture hooks), read every layer
    through ``readout`` (the probe, with the residuals of ``keep`` and of
    ``settings.keep_layers``), keep the activations of
    ``blocks`` at the last position and, with ``arms``, every arm's total and direct effect.
    Cloze prompt sets run :func:`calibrate.engine.cloze_neurons.cloze_neuron_pass` (ablation at
    every position that scores a continuation token)."""
    from calibrate.engine.prefix import grouped_batches

    lens = readout or LogitLens(loaded.adapter)
    direct = direct and arms is not None and direct_readable(lens)
    if prompt_set.is_cloze:
        from calibrate.engine.cloze_neurons import cloze_neuron_pass

        return cloze_neuron_pass(loaded, prompt_set, blocks, settings, readout, keep, arms,
                                 direct, arm_chunk)
    token_ids = tokenize(loaded, prompt_set.prompts)
    n, k = prompt_set.option_ids.shape
    last = loaded.adapter.num_blocks
    blocks = sorted(int(b) for b in blocks)
    first = min(blocks)
    logits = np.empty((n, last + 1, k), dtype=np.float32)
    mass_width = {"all": last + 1, "final": 1}.get(settings.option_mass)
    mass = None if mass_width is None else np.empty((n, mass_width), dtype=np.float64)
    keep = sorted({*keep, *settings.keep_layers})  # given here or by settings.keeping(...)
    kept = {layer: np.empty((n, loaded.adapter.unembed_weight.shape[1]), np.float32)
            for layer in keep}
    acts = {b: np.empty((n, mlp_parts(loaded.adapter, b).width), np.float32) for b in blocks}
    total = direct_out = None
    if arms is not None:
        if tuple(arms.blocks) != tuple(blocks):
            raise ValueError(f"arms over blocks {arms.blocks}, pass over {blocks}")
        total = np.empty((arms.n_arms, n, last + 1 - first, k), dtype=np.float32)
        direct_out = np.empty_like(total) if direct else None
    weights = {b: mlp_parts(loaded.adapter, b).out_weight.detach().float() for b in blocks}
    counts = {"real": 0, "computed": 0}
    budget = settings.max_tokens * loaded.adapter.num_blocks

    def on_prefix(prefix) -> None:
        counts["real"] += prefix.length
        counts["computed"] += prefix.length

    def run(idx: np.ndarray, _settings: ProbeSettings, prefix):
        option_ids = torch.from_numpy(prompt_set.option_ids[idx])
        with torch.inference_mode():
            if prefix is not None:
                suffixes = [token_ids[i][prefix.length:] for i in idx]
                context = suffix_contexts(loaded, prefix, suffixes)
                real = sum(len(s) for s in suffixes)
                computed = len(suffixes) * max(len(s) for s in suffixes)
            else:
                ids, mask = left_pad([token_ids[i] for i in idx], loaded.tokenizer.pad_token_id)
                if ids.shape[1] < 2:
                    raise NeuronAblationError("neuron ablation needs prompts of at least two "
                                              "tokens (the context is cached before the last)")
                context = whole_contexts(loaded, ids, mask)
                real, computed = int(mask.sum()), mask.numel()
            with capture_mlps(loaded.adapter, blocks) as store:
                state = last_states(loaded, context)
            stacked = state.residuals.to(lens.device)
            check_finite(stacked)
            base, batch_mass = _lens_batch(lens, stacked, option_ids, settings.option_mass)
            out = None
            if arms is not None:
                out = _arm_batch(loaded, lens, state, option_ids, arms, weights,
                                 store["activations"], store["outputs"], direct, arm_chunk,
                                 budget)
        return base, batch_mass, stacked, store["activations"], out, real, computed

    with tqdm(total=n, desc=f"neurons {loaded.name}" + (f" x{arms.n_arms}" if arms else ""),
              unit="ex", disable=not settings.progress) as bar:
        for idx, (base, batch_mass, stacked, batch_acts, out, real, computed) in grouped_batches(
                loaded, token_ids, prompt_set.groups, settings, run, gapped=True,
                on_prefix=on_prefix):
            logits[idx] = base.cpu().numpy()
            if mass is not None:
                mass[idx] = batch_mass.cpu().numpy()
            for layer, dest in kept.items():
                dest[idx] = stacked[:, layer].float().cpu().numpy()
            for b in blocks:
                acts[b][idx] = batch_acts[b].cpu().numpy()
            if out is not None:
                total[:, idx] = out[0].numpy()
                if direct_out is not None:
                    direct_out[:, idx] = out[1].numpy()
            counts["real"] += real
            counts["computed"] += computed
            bar.update(len(idx))
    from calibrate.core.option_scores import option_probabilities

    result = ProbeResult(logits, option_probabilities(logits), prompt_set.labels.copy(), mass,
                         kept, counts["real"], counts["computed"])
    return NeuronPass(result, acts, first, total, direct_out)


def last_layer_edits(loaded: LoadedModel, residual: np.ndarray, deltas: np.ndarray,
                     option_ids: np.ndarray, readout: Readout | None = None,
                     direct: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Option logits [A, N, K] of the last layer's residual ``residual`` [N, H] plus each of
    ``deltas`` [A, N, H]: read as the model reads it (the norm recomputed) and, where the
    readout allows (:func:`direct_readable`), with the final norm's scale held at that of
    ``residual`` (None otherwise). No forward pass."""
    lens = readout or LogitLens(loaded.adapter)
    direct = direct and direct_readable(lens)
    last = loaded.adapter.num_blocks
    x = torch.as_tensor(np.asarray(residual), dtype=torch.float32, device=lens.device)
    d = torch.as_tensor(np.asarray(deltas), dtype=torch.float32, device=lens.device)
    ids = torch.as_tensor(np.asarray(option_ids), dtype=torch.long)
    with torch.inference_mode():
        edited = (x[None] + d).reshape(-1, 1, x.shape[-1])
        total = _read_rows(lens, edited, [last], ids.repeat(len(d), 1))
        total = total.reshape(len(d), len(x), -1).cpu().numpy()
        if not direct:
            return total, None
        affine = final_norm_affine(loaded.adapter)
        frozen = _direct(lens, affine, x[:, None], d[:, :, None], ids)[:, :, 0]
    return total, frozen.cpu().numpy()
