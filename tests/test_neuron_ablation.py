"""Neuron ablation against references: every arm's read equals a full forward pass with the
neurons' activations replaced by a hook, on tiny random models of every architecture (gated and
ungated MLPs, Gemma's post-MLP norm); the direct effect of a hand-computed edit; hooks go away."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import build_tiny

from calibrate.engine.neuron_ablation import (
    NeuronAblationError,
    NeuronArms,
    capture_mlps,
    direct_readable,
    last_layer_edits,
    neuron_pass,
    output_weights,
)
from calibrate.engine.probe import ProbeSettings, run_probe
from calibrate.model.adapters import SUPPORTED_ARCHITECTURES
from calibrate.model.load import wrap_model
from calibrate.tasks.prompts import PromptConfig, build_prompts

DATASET = PromptConfig(name="toy", answer_format="verbalizer", verbalizer=[" negative", " positive"],
                       template="{question} \n question : is this sentence positive or negative ? "
                                "answer :")
SENTENCES = ["the movie was great", "a very boring film", "this film is not good , it was bad",
             "fun", "the the the movie was very very fun and good good"]
SETTINGS = ProbeSettings(progress=False, option_mass="none")
ARMS = [[(3, 5, 1.0)],                      # the last block: no forward pass
        [(1, 7, 1.0)],                      # the first block: the blocks above run
        [(2, 3, 2.5)],                      # a scaled change
        [(1, 2, 1.0), (3, 9, 1.0)],         # a set across blocks: a hook in block 3
        [(2, 4, 1.0), (2, 8, 0.5), (3, 1, 1.0)]]


@pytest.fixture(params=SUPPORTED_ARCHITECTURES)
def lm(request, word_tokenizer):
    """A tiny random model of every supported architecture (3 blocks, hidden 32, d_mlp 64 or
    128)."""
    return wrap_model(build_tiny(request.param, len(word_tokenizer)), word_tokenizer,
                      name=f"tiny-{request.param}")


def prompt_set(tokenizer):
    recs = [SimpleNamespace(question=s, options=("bad", "good"), label=i % 2, subject="")
            for i, s in enumerate(SENTENCES)]
    return build_prompts(recs, DATASET, tokenizer)


def down_module(model, model_type: str, block: int):
    """The MLP output projection of a (1-based) block, named by hand per architecture."""
    i = block - 1
    if model_type == "phi":
        return model.model.layers[i].mlp.fc2
    if model_type == "gpt2":
        return model.transformer.h[i].mlp.c_proj
    if model_type == "gpt_neox":
        return model.gpt_neox.layers[i].mlp.dense_4h_to_h
    if model_type == "opt":
        return model.model.decoder.layers[i].fc2
    return model.model.layers[i].mlp.down_proj


def final_norm(model, model_type: str):
    if model_type == "phi":
        return model.model.final_layernorm
    if model_type == "gpt2":
        return model.transformer.ln_f
    if model_type == "gpt_neox":
        return model.gpt_neox.final_layer_norm
    if model_type == "opt":
        return model.model.decoder.final_layer_norm
    return model.model.norm


def reference_logits(lm, prompt: str, option_ids: np.ndarray, arm, means) -> np.ndarray:
    """[L+1, K] option logits of one prompt run alone and whole through ``lm.model``, with each
    arm neuron's activation at the last position replaced by ``a + s (mean - a)`` by a hook;
    layers below the last read by hand (final norm, head, soft-capping), the last is the
    model's own logits."""
    model, model_type = lm.model, lm.model.config.model_type
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    handles = []

    def make(block, changes):
        def pre(_m, args):
            x = args[0].clone()
            last = x[:, -1] if x.ndim == 3 else x[-1:]  # OPT flattens [B*T, d]
            for neuron, scale in changes:
                mean = float(means[block][neuron])
                last[..., neuron] = last[..., neuron] + scale * (mean - last[..., neuron])
            if x.ndim == 3:
                x[:, -1] = last
            else:
                x[-1:] = last
            return (x, *args[1:])
        return pre

    per_block: dict[int, list] = {}
    for block, neuron, scale in arm:
        per_block.setdefault(block, []).append((neuron, scale))
    try:
        for block, changes in per_block.items():
            handles.append(down_module(model, model_type, block).register_forward_pre_hook(
                make(block, changes)))
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    norm, head = final_norm(model, model_type), model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    rows = []
    with torch.no_grad():
        for hidden in out.hidden_states[:-1]:
            logits = head(norm(hidden[0, -1]))
            if cap:
                logits = torch.tanh(logits / cap) * cap
            rows.append(logits[option_ids].numpy())
        rows.append(out.logits[0, -1, option_ids].numpy())
    return np.stack(rows)


def _means(lm, blocks, seed=0):
    rng = np.random.default_rng(seed)
    return {b: rng.standard_normal(output_weights(lm.adapter, b).shape[0]) * 3.0 for b in blocks}


def test_every_arm_equals_a_hooked_full_forward_pass(lm):
    ps, blocks = prompt_set(lm.tokenizer), [1, 2, 3]
    means = _means(lm, blocks)
    arms = NeuronArms.build(blocks, means, ARMS)
    out = neuron_pass(lm, ps, blocks, SETTINGS, arms=arms)
    assert out.first == 1 and out.total.shape == (len(ARMS), len(SENTENCES), 3, 2)
    base = run_probe(lm, ps, SETTINGS).option_logits
    np.testing.assert_allclose(out.result.option_logits, base, rtol=1e-4, atol=1e-4)
    for a, arm in enumerate(ARMS):
        for i, prompt in enumerate(ps.prompts):
            ref = reference_logits(lm, prompt, ps.option_ids[i], arm, means)
            np.testing.assert_allclose(out.total[a, i], ref[1:], rtol=1e-4, atol=1e-4,
                                       err_msg=f"arm {arm}, prompt {i}")
            lowest = min(b for b, _, _ in arm)
            np.testing.assert_allclose(out.total[a, i, :lowest - 1], base[i, 1:lowest],
                                       atol=1e-5)  # below the arm's lowest block: unchanged
    assert not np.allclose(out.total[:, :, -1], base[None, :, -1], atol=1e-4)  # it did something


def test_the_captured_activations_are_the_last_positions(lm):
    ps = prompt_set(lm.tokenizer)
    out = neuron_pass(lm, ps, [2], SETTINGS)
    down = down_module(lm.model, lm.model.config.model_type, 2)
    for i, prompt in enumerate(ps.prompts):
        seen = []
        handle = down.register_forward_pre_hook(lambda _m, a, seen=seen: seen.append(a[0].clone()))
        try:
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([lm.tokenizer(prompt)["input_ids"]]))
        finally:
            handle.remove()
        last = seen[0][0, -1] if seen[0].ndim == 3 else seen[0][-1]
        np.testing.assert_allclose(out.activations[2][i], last.numpy(), rtol=1e-4, atol=1e-5)


def test_output_weights_are_what_each_neuron_writes(lm):
    """Row i is the change of the MLP's residual write when activation i goes up by one (a
    hand-run of the projection on a one-hot input), through the post-MLP norm's gain."""
    model_type = lm.model.config.model_type
    down = down_module(lm.model, model_type, 3)
    weights = output_weights(lm.adapter, 3)
    width = weights.shape[0]
    with torch.no_grad():
        zero = down(torch.zeros(1, width))
        for i in (0, 5, width - 1):
            one = torch.zeros(1, width)
            one[0, i] = 1.0
            written = (down(one) - zero)[0]
            if model_type in ("gemma2", "gemma3_text"):
                written = written * (1.0 + lm.model.model.layers[2].post_feedforward_layernorm.weight)
            np.testing.assert_allclose(weights[i].numpy(), written.numpy(), rtol=1e-5, atol=1e-6)


def test_direct_effect_of_an_edit_along_the_residual(lm):
    """Adding c·x to the last residual x: the model's read is unchanged (the norm divides the
    scale away, up to its eps), the read with the norm's scale held fixed is the head applied to
    normed + c·(normed − norm bias), by hand."""
    ps = prompt_set(lm.tokenizer)
    model, model_type = lm.model, lm.model.config.model_type
    base = run_probe(lm, ps, SETTINGS.keeping([3]))
    x = base.residuals[3]
    c = 0.7
    total, direct = last_layer_edits(lm, x, c * x[None], ps.option_ids)
    np.testing.assert_allclose(total[0], base.option_logits[:, -1], rtol=1e-3, atol=1e-3)
    norm, head = final_norm(model, model_type), model.get_output_embeddings()
    bias = getattr(norm, "bias", None)
    cap = getattr(model.config, "final_logit_softcapping", None)
    with torch.no_grad():
        normed = norm(torch.as_tensor(x))
        shift = normed - (bias if bias is not None else 0.0)
        logits = head(normed + c * shift)
        if cap:
            logits = torch.tanh(logits / cap) * cap
    want = np.take_along_axis(logits.numpy(), ps.option_ids, axis=1)
    np.testing.assert_allclose(direct[0], want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(direct[0], total[0], atol=1e-3)


def test_direct_effect_per_layer_sums_the_blocks_below(lm):
    """The direct read of an arm at layer l adds the changes of its blocks <= l only: a set in
    blocks 1 and 3 reads block 1's change alone at layers 1 and 2."""
    ps, blocks = prompt_set(lm.tokenizer), [1, 2, 3]
    means = _means(lm, blocks, seed=3)
    arms = NeuronArms.build(blocks, means, [[(1, 2, 1.0)], [(1, 2, 1.0), (3, 9, 1.0)]])
    out = neuron_pass(lm, ps, blocks, SETTINGS, arms=arms)
    np.testing.assert_allclose(out.direct[1, :, :2], out.direct[0, :, :2], atol=1e-6)
    assert not np.allclose(out.direct[1, :, 2], out.direct[0, :, 2], atol=1e-5)


def test_hooks_are_removed_after_an_error(lm):
    blocks = [2, 3]
    with pytest.raises(RuntimeError, match="boom"), capture_mlps(lm.adapter, blocks):
        raise RuntimeError("boom")
    for b in blocks:
        assert not down_module(lm.model, lm.model.config.model_type, b)._forward_pre_hooks


def test_arms_are_checked():
    with pytest.raises(ValueError, match="outside the captured"):
        NeuronArms.build([2, 3], {2: np.zeros(4), 3: np.zeros(4)}, [[(1, 0, 1.0)]])
    with pytest.raises(ValueError, match="twice"):
        NeuronArms.build([3], {3: np.zeros(4)}, [[(3, 1, 1.0), (3, 1, 0.5)]])
    with pytest.raises(ValueError, match="no neuron"):
        NeuronArms.build([3], {3: np.zeros(4)}, [[]])


def test_cloze_prompts_need_a_whole_vocabulary_readout_and_prompts(word_tokenizer):
    """Cloze prompt sets run (tests/test_cloze_neurons.py); a readout of the options alone and
    an empty set are refused, each in one line naming what was given, before any pass."""
    from calibrate.engine.lens import LogitLens
    from calibrate.tasks.continuations import build_requests

    lm = wrap_model(build_tiny("llama", len(word_tokenizer)), word_tokenizer, name="tiny")

    class OptionsOnly(LogitLens):
        name = "options-only"
        full_vocabulary = False

    reqs = tuple(build_requests(word_tokenizer, ["the movie"], [["was fun", "bad"]]))
    cloze = SimpleNamespace(requests=reqs, cloze_norm="none", groups=None, is_cloze=True,
                            labels=np.array([0]))
    with pytest.raises(ValueError, match="the options-only readout reads only the answer options"):
        neuron_pass(lm, cloze, [3], SETTINGS, readout=OptionsOnly(lm.adapter))
    empty = SimpleNamespace(**{**cloze.__dict__, "requests": (), "labels": np.array([])})
    with pytest.raises(NeuronAblationError, match="no cloze prompts"):
        neuron_pass(lm, empty, [3], SETTINGS)


def test_direct_reads_need_the_logit_lens_state(lm):
    from calibrate.engine.lens import LogitLens

    class Other(LogitLens):
        def prepare(self, residual, layers):
            return super().prepare(residual, layers) * 2

    assert direct_readable(LogitLens(lm.adapter)) and not direct_readable(Other(lm.adapter))
