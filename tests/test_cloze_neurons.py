"""Cloze neuron ablation against references: on tiny random models of every architecture
(gated and ungated MLPs, Gemma's post-MLP norm), every arm's per-layer option log-likelihood
equals a full forward pass of context + continuation with the neurons' activations replaced by
a hook at the scoring positions (the context's last token and the continuation's tokens but the
last); the direct effect equals a hand-made frozen-scale read; the pooled mean is the mean over
the scored terms of a hooked pass."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_neuron_ablation import ARMS, down_module, final_norm, lm  # noqa: F401 - lm: fixture

from calibrate.engine.cloze import run_cloze
from calibrate.engine.cloze_neurons import cloze_final_edits, final_term_mean
from calibrate.engine.neuron_ablation import NeuronArms, neuron_pass, output_weights
from calibrate.engine.probe import ProbeSettings
from calibrate.tasks.continuations import build_requests

CONTEXTS = ["question : the movie was great ? answer :", "question : is this a film ? answer :",
            "the movie", "a very boring film . question : good or bad ? answer :"]
OPTIONS = [["very good fun", "bad", "not very good ."], ["yes", "no no"],
           ["was fun", "film", "is not very very good , it was bad", "the"],
           ["good", "very bad", "very good", "very good fun , not bad"]]
SETTINGS = ProbeSettings(progress=False, option_mass="none")


def cloze_set(tokenizer, norm: str = "none"):
    reqs = build_requests(tokenizer, CONTEXTS, OPTIONS)
    return SimpleNamespace(requests=tuple(reqs), cloze_norm=norm, groups=None, is_cloze=True,
                           labels=np.array([0, 1, 2, 3]))


def _means(lm, blocks, seed=0):
    rng = np.random.default_rng(seed)
    return {b: rng.standard_normal(output_weights(lm.adapter, b).shape[0]) * 3.0 for b in blocks}


def _hooked(lm, ids: list[int], scored: slice, arm, means, capture_final: list | None = None):
    """A full forward pass of ``ids`` with each arm neuron replaced at positions ``scored``."""
    model, model_type = lm.model, lm.model.config.model_type
    handles = []
    per_block: dict[int, list] = {}
    for block, neuron, scale in arm:
        per_block.setdefault(block, []).append((neuron, scale))

    def make(block, changes):
        def pre(_m, args):
            x = args[0].clone()
            flat = x.ndim == 2  # OPT flattens [B*T, d]
            view = x[None] if flat else x
            for neuron, scale in changes:
                cur = view[0, scored, neuron]
                view[0, scored, neuron] = cur + scale * (float(means[block][neuron]) - cur)
            return (view[0] if flat else view, *args[1:])
        return pre

    try:
        for block, changes in per_block.items():
            handles.append(down_module(model, model_type, block).register_forward_pre_hook(
                make(block, changes)))
        if capture_final is not None:
            handles.append(final_norm(model, model_type).register_forward_pre_hook(
                lambda _m, args: capture_final.append(args[0][0].clone())))
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()


def _head_logprobs(lm, normed: torch.Tensor) -> torch.Tensor:
    model = lm.model
    logits = model.get_output_embeddings()(normed)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits.double(), dim=-1)


def reference_loglik(lm, request, option: int, arm, means) -> np.ndarray:
    """[L+1] log-likelihood of one option's continuation at every layer, by a hooked full pass;
    layers below the last read by hand (final norm, head), the last from the model's logits."""
    ctx, cont = request.context_ids, request.continuations[option]
    ids, t = list(ctx) + list(cont), len(ctx)
    scored = slice(t - 1, t + len(cont) - 1)
    out = _hooked(lm, ids, scored, arm, means)
    norm = final_norm(lm.model, lm.model.config.model_type)
    target = torch.tensor(cont)
    rows = []
    with torch.no_grad():
        for hidden in out.hidden_states[:-1]:
            lp = _head_logprobs(lm, norm(hidden[0, scored]))
            rows.append(float(lp[torch.arange(len(cont)), target].sum()))
        lp = torch.log_softmax(out.logits[0, scored].double(), dim=-1)
        rows.append(float(lp[torch.arange(len(cont)), target].sum()))
    return np.array(rows)


@pytest.mark.parametrize("norm", ["none", "token"])
def test_every_arm_equals_a_hooked_full_forward_pass(lm, norm):
    ps, blocks = cloze_set(lm.tokenizer, norm), [1, 2, 3]
    means = _means(lm, blocks)
    arms = NeuronArms.build(blocks, means, ARMS)
    out = neuron_pass(lm, ps, blocks, SETTINGS, arms=arms)
    assert out.first == 1 and out.total.shape == (len(ARMS), 4, 3, 4)
    base = run_cloze(lm, list(ps.requests), ps.labels, SETTINGS, norm=norm).option_logits
    np.testing.assert_allclose(out.result.option_logits, base, rtol=1e-5, atol=1e-5)
    for a, arm in enumerate(ARMS):
        for i, req in enumerate(ps.requests):
            for k, cont in enumerate(req.continuations):
                ref = reference_loglik(lm, req, k, arm, means)
                ref = ref / (len(cont) if norm == "token" else 1.0)
                np.testing.assert_allclose(out.total[a, i, :, k], ref[1:], rtol=1e-4, atol=1e-4,
                                           err_msg=f"arm {arm}, example {i}, option {k}")
            assert np.all(np.isneginf(out.total[a, i, :, req.n_options:]))
        lowest = min(b for b, _, _ in arm)
        np.testing.assert_array_equal(out.total[a, :, :lowest - 1],
                                      out.result.option_logits[:, 1:lowest])
    assert not np.allclose(out.total[:, :, -1], base[None, :, -1], atol=1e-4)  # it did something


def _frozen_reference(lm, request, option: int, arm, means) -> float:
    """The last layer's log-likelihood with the arm's residual change read through the final
    norm at the unablated scale: ``(norm(x + Δ) − b)·s(x + Δ)/s(x) + b``, s by hand."""
    ctx, cont = request.context_ids, request.continuations[option]
    ids, t = list(ctx) + list(cont), len(ctx)
    scored = slice(t - 1, t + len(cont) - 1)
    plain, edited = [], []
    _hooked(lm, ids, scored, [], means, plain)
    _hooked(lm, ids, scored, arm, means, edited)
    x, y = plain[0][scored].double(), edited[0][scored].double()
    norm = final_norm(lm.model, lm.model.config.model_type)
    layer_norm = isinstance(norm, torch.nn.LayerNorm)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)

    def s(v):
        centred = v - v.mean(-1, keepdim=True) if layer_norm else v
        return torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps)

    bias = getattr(norm, "bias", None)
    bias = 0.0 if bias is None else bias.double()
    with torch.no_grad():
        frozen = (norm(y.float()).double() - bias) * s(y) / s(x) + bias
        lp = _head_logprobs(lm, frozen.float())
    return float(lp[torch.arange(len(cont)), torch.tensor(cont)].sum())


def test_the_direct_effect_holds_the_norms_scale(lm, monkeypatch):
    """Also: the last block's arms are read in logit space (no per-arm vocabulary product)."""
    from calibrate.engine import neuron_logits

    ps, blocks = cloze_set(lm.tokenizer), [3]
    means = _means(lm, blocks, seed=2)
    arm = [(3, 5, 1.0), (3, 11, 2.0)]
    calls = []
    read = neuron_logits.LastBlockLogits.read
    monkeypatch.setattr(neuron_logits.LastBlockLogits, "read",
                        lambda self, *a, **k: calls.append(1) or read(self, *a, **k))
    out = neuron_pass(lm, ps, blocks, SETTINGS, arms=NeuronArms.build(blocks, means, [arm]))
    assert calls
    for i, req in enumerate(ps.requests):
        for k in range(req.n_options):
            want = _frozen_reference(lm, req, k, arm, means)
            np.testing.assert_allclose(out.direct[0, i, -1, k], want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(out.direct[0, :, -1], out.total[0, :, -1], atol=1e-4)


def test_the_pooled_mean_is_over_every_scored_term(lm):
    """Mean and std of a block's activations over (option, scoring position) pairs, from a
    hooked full pass per option."""
    ps = cloze_set(lm.tokenizer)
    out = neuron_pass(lm, ps, [2], SETTINGS)
    down = down_module(lm.model, lm.model.config.model_type, 2)
    seen = []
    for req in ps.requests:
        for cont in req.continuations:
            ids, t = list(req.context_ids) + list(cont), len(req.context_ids)
            got = []
            handle = down.register_forward_pre_hook(lambda _m, a, got=got: got.append(a[0].clone()))
            try:
                with torch.no_grad():
                    lm.model(input_ids=torch.tensor([ids]))
            finally:
                handle.remove()
            acts = got[0].reshape(len(ids), -1)
            seen.append(acts[t - 1:t + len(cont) - 1].double().numpy())
    seen = np.concatenate(seen)
    assert out.terms.sum() == len(seen) == sum(len(c) for r in ps.requests for c in r.continuations)
    np.testing.assert_allclose(out.pooled_mean()[2], seen.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.pooled_std()[2], seen.std(0), rtol=1e-3, atol=1e-4)


def test_a_last_layer_edit_of_the_scoring_states(lm):
    """Removing the component along v of every scoring state at the last layer and putting
    back its mean: by a hook on the final norm's input at the scored positions."""
    ps = cloze_set(lm.tokenizer)
    out = neuron_pass(lm, ps, [3], SETTINGS)
    v = np.random.default_rng(4).standard_normal(lm.adapter.unembed_weight.shape[1])
    v /= np.linalg.norm(v)
    mean = final_term_mean(out, v)

    def deltas(states):
        return ((mean - states.astype(np.float64) @ v)[:, None] * v[None])[None]

    total, direct = cloze_final_edits(lm, out, deltas)
    assert direct is not None and total.shape == (1, 4, 4)
    model, model_type = lm.model, lm.model.config.model_type
    vt = torch.as_tensor(v, dtype=torch.float32)
    for i, req in enumerate(ps.requests):
        for k, cont in enumerate(req.continuations):
            ids, t = list(req.context_ids) + list(cont), len(req.context_ids)
            scored = slice(t - 1, t + len(cont) - 1)

            def pre(_m, args, scored=scored):
                x = args[0].clone()
                x[0, scored] += (mean - x[0, scored] @ vt)[:, None] * vt[None]
                return (x, *args[1:])

            handle = final_norm(model, model_type).register_forward_pre_hook(pre)
            try:
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([ids])).logits
            finally:
                handle.remove()
            lp = torch.log_softmax(logits[0, scored].double(), -1)
            want = float(lp[torch.arange(len(cont)), torch.tensor(cont)].sum())
            np.testing.assert_allclose(total[0, i, k], want, rtol=1e-4, atol=1e-4)
        assert np.all(np.isneginf(total[0, i, req.n_options:]))


def test_the_logit_space_read_does_not_depend_on_its_chunks(lm):
    """The last block's arms read over chunks of 5 states and 2 at a time for the arms equal
    the default chunks (64 and 16: one chunk here), token by token."""
    from calibrate.engine.cloze import cloze_readout
    from calibrate.engine.neuron_logits import LastBlockLogits

    blocks = [3]
    arms = NeuronArms.build(blocks, _means(lm, blocks, seed=5),
                            [[(3, 5, 1.0)], [(3, 2, 1.0), (3, 9, 0.5)]])
    lens, _ = cloze_readout(lm.adapter)
    reader = LastBlockLogits(lm, lens, arms)
    gen = torch.Generator().manual_seed(0)
    hidden, width = lm.adapter.unembed_weight.shape[1], output_weights(lm.adapter, 3).shape[0]
    x = torch.randn(23, hidden, generator=gen) * 3
    acts = torch.randn(23, width, generator=gen)
    outs = torch.randn(23, hidden, generator=gen) if reader.post is not None else None
    state = torch.arange(23).repeat_interleave(2)
    target = torch.randint(0, lens.weight.shape[0], (46,), generator=gen)
    with torch.inference_mode():
        whole = reader.read(x, acts, outs, state, target, True)
        pieces = reader.read(x, acts, outs, state, target, True, chunk=5, inner=2)
    for a, b in zip(whole, pieces):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)
