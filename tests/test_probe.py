"""The probe against independent references: the model's own logits, unbatched runs,
``output_hidden_states`` handled correctly."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from calibrate.engine import probe as probe_mod
from calibrate.engine.probe import (
    NonFiniteActivations,
    ProbeSettings,
    left_pad,
    plan_batches,
    run_probe,
    tokenize,
)
from calibrate.errors import ConfigError
from calibrate.tasks.prompts import PromptConfig, build_prompts

SENTENCES = ["the movie was great", "a very boring film", "this film is not good , it was bad",
             "fun", "the the the movie was very very fun and good good", "bad"]
DATASET = PromptConfig(name="toy", answer_format="verbalizer",
                       verbalizer=(" negative", " positive"),
                       template="{question} \n question : is this sentence positive or negative ? answer :")
LETTERS = PromptConfig(name="toy", answer_format="letters", verbalizer=None,
                       template="{question}\n{choices}\nanswer :")


def records(n_options: int = 2):
    return [SimpleNamespace(question=s, options=("bad", "good", "fun")[:n_options], label=i % n_options,
                            subject="") for i, s in enumerate(SENTENCES)]


def model_logits(loaded, prompt: str) -> torch.Tensor:
    enc = loaded.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**enc).logits[0, -1]


def test_last_layer_equals_model_logits(tiny):
    prompts = build_prompts(records(), DATASET, tiny.tokenizer)
    result = run_probe(tiny, prompts, ProbeSettings(progress=False, option_mass="all"))
    assert result.num_layers == tiny.adapter.num_blocks + 1
    for i, prompt in enumerate(prompts.prompts):
        ref = model_logits(tiny, prompt)
        torch.testing.assert_close(torch.from_numpy(result.option_logits[i, -1]),
                                   ref[prompts.option_ids[i]], rtol=1e-5, atol=1e-5)
        ref_mass = torch.softmax(ref.double(), -1)[prompts.option_ids[i]].sum()
        assert result.option_mass[i, -1] == pytest.approx(float(ref_mass), rel=1e-5)


def test_batched_equals_unbatched(tiny):
    prompts = build_prompts(records(), DATASET, tiny.tokenizer)
    batched = run_probe(tiny, prompts, ProbeSettings(batch_size=4, progress=False))
    single = run_probe(tiny, prompts, ProbeSettings(batch_size=1, progress=False))
    np.testing.assert_allclose(batched.option_logits, single.option_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batched.probs, single.probs, rtol=1e-6, atol=1e-9)


def test_hook_residuals_match_hidden_states(tiny):
    """Layers 0..L-1 equal output_hidden_states; HF's last entry is already normalized (trap 1)."""
    prompts = build_prompts(records()[:1], DATASET, tiny.tokenizer)
    n_layers = tiny.adapter.num_blocks + 1
    result = run_probe(tiny, prompts, ProbeSettings(progress=False).keeping(range(n_layers)))
    enc = tiny.tokenizer(prompts.prompts[0], return_tensors="pt")
    with torch.no_grad():
        hidden = tiny.model(**enc, output_hidden_states=True).hidden_states
    assert len(hidden) == n_layers
    for layer in range(n_layers - 1):
        np.testing.assert_allclose(result.residuals[layer][0], hidden[layer][0, -1].numpy(),
                                   rtol=1e-5, atol=1e-6)
    last = torch.from_numpy(result.residuals[n_layers - 1])
    normed = tiny.adapter.final_norm(last)
    torch.testing.assert_close(normed[0], hidden[-1][0, -1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(last[0], hidden[-1][0, -1], atol=1e-3)


def test_variable_option_counts_mask_missing_options(tiny):
    recs = records(3)
    recs[0] = SimpleNamespace(question="the movie", options=("bad", "good"), label=1, subject="")
    prompts = build_prompts(recs, LETTERS, tiny.tokenizer)
    result = run_probe(tiny, prompts, ProbeSettings(progress=False))
    assert prompts.option_ids[0, 2] == -1
    assert np.all(result.probs[0, :, 2] == 0.0)
    np.testing.assert_allclose(result.probs.sum(-1), 1.0, atol=1e-12)


def test_plan_batches_respects_budget_and_covers_all():
    lengths = np.array([5, 40, 12, 12, 3, 40, 7])
    batches = plan_batches(lengths, ProbeSettings(max_batch_size=3, max_tokens=80, min_fill=0.0))
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or lengths[batch].max() * len(batch) <= 80
    assert lengths[batches[0]].max() == 40  # longest first: an OOM shows up at once


def test_padding_efficiency_is_high_when_sorted(tiny):
    prompts = build_prompts(records() * 5, DATASET, tiny.tokenizer)
    result = run_probe(tiny, prompts, ProbeSettings(max_batch_size=5, progress=False))
    lengths = [len(t) for t in tokenize(tiny, prompts.prompts)]
    assert result.real_tokens == sum(lengths)
    assert result.padding_efficiency > 0.9


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert probe_mod.position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_out_of_memory_halves_the_batch(tiny, monkeypatch):
    prompts = build_prompts(records(), DATASET, tiny.tokenizer)
    reference = run_probe(tiny, prompts, ProbeSettings(batch_size=1, progress=False))
    real_forward, sizes = probe_mod.forward_batch, []

    def flaky(loaded, lens, ids, *args):
        sizes.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(loaded, lens, ids, *args)

    monkeypatch.setattr(probe_mod, "forward_batch", flaky)
    result = run_probe(tiny, prompts, ProbeSettings(batch_size=6, progress=False))
    assert sizes[0] == 6 and max(sizes[1:]) <= 3  # at most half the failed batch afterwards
    np.testing.assert_allclose(result.option_logits, reference.option_logits, rtol=1e-5, atol=1e-5)


def test_other_runtime_errors_propagate(tiny, monkeypatch):
    prompts = build_prompts(records(), DATASET, tiny.tokenizer)

    def broken(*_args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(probe_mod, "forward_batch", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_probe(tiny, prompts, ProbeSettings(progress=False))


def test_non_finite_residual_names_the_layer(tiny):
    prompts = build_prompts(records(), DATASET, tiny.tokenizer)
    block = tiny.adapter.blocks[1]  # its output is layer 2
    handle = block.register_forward_hook(lambda _m, _a, out: (out[0] * float("inf"),) + out[1:]
                                         if isinstance(out, tuple) else out * float("inf"))
    try:
        with pytest.raises(NonFiniteActivations, match="layer 2"):
            run_probe(tiny, prompts, ProbeSettings(progress=False))
    finally:
        handle.remove()


def test_plan_batches_keeps_padding_low():
    lengths = np.array([100, 98, 97, 60, 59, 58, 20, 19, 18, 18])
    batches = plan_batches(lengths, ProbeSettings(max_batch_size=64, max_tokens=10_000, min_fill=0.9))
    for batch in batches:
        assert lengths[batch].sum() / (lengths[batch].max() * len(batch)) >= 0.9
    assert [sorted(lengths[b].tolist()) for b in batches] == [[97, 98, 100], [58, 59, 60], [18, 18, 19, 20]]


# ---------------------------------------------------------------- the probe group, checked

PROBE_BAD = [
    ("batch_size", 0, "probe.batch_size=0", "auto or an integer >= 1"),
    ("batch_size", -4, "probe.batch_size=-4", "an integer >= 1"),
    ("batch_size", "many", "probe.batch_size='many'", "auto"),
    ("batch_size", True, "probe.batch_size=True", "an integer >= 1"),
    ("max_batch_size", 2.5, "probe.max_batch_size=2.5", "an integer >= 1"),
    ("max_tokens", -1, "probe.max_tokens=-1", "an integer >= 1"),
    ("min_fill", 1.5, "probe.min_fill=1.5", "a number in [0, 1]"),
    ("min_fill", -0.1, "probe.min_fill=-0.1", "a number in [0, 1]"),
    ("min_fill", "0.5", "probe.min_fill='0.5'", "a number in [0, 1]"),
    ("min_fill", float("nan"), "probe.min_fill=nan", "a number in [0, 1]"),
    ("option_mass", "x", "probe.option_mass='x'", "final, all, none"),
    ("prefix_reuse", 2, "probe.prefix_reuse=2", "true, false"),
    ("progress", "off", "probe.progress='off'", "true, false"),
]


@pytest.mark.parametrize("key, value, named, accepted", PROBE_BAD)
def test_probe_settings_reject(key, value, named, accepted):
    with pytest.raises(ConfigError, match=re.escape(named) + ".*" + re.escape(accepted)):
        ProbeSettings(**{key: value})


@pytest.mark.parametrize("key, value", [("batch_size", "auto"), ("batch_size", None),
                                        ("batch_size", 8), ("min_fill", 0), ("min_fill", 1.0),
                                        ("option_mass", "all"), ("option_mass", "none")])
def test_probe_settings_accept(key, value):
    settings = ProbeSettings(**{key: value})
    assert getattr(settings, key) == (None if value == "auto" else value)


def test_probe_settings_defaults_and_the_composed_group():
    from conftest import typed

    default = ProbeSettings()
    assert default.batch_size is None  # auto
    assert (default.max_batch_size, default.max_tokens, default.min_fill, default.option_mass,
            default.prefix_reuse, default.progress) == (64, 8192, 0.9, "final", True, True)
    assert typed().probe == default
    assert typed("probe.batch_size=4", "probe.option_mass=all").probe == \
        ProbeSettings(batch_size=4, option_mass="all")
    with pytest.raises(ConfigError, match=re.escape("probe.min_fill=1.5; accepted: a number in [0, 1]")):
        typed("probe.min_fill=1.5")


def test_keeping_adds_the_layers_to_a_copy():
    settings = ProbeSettings(batch_size=2, progress=False)
    keeping = settings.keeping([3, 1])
    assert keeping.keep_layers == (3, 1) and settings.keep_layers == ()
    assert (keeping.batch_size, keeping.progress) == (2, False)
    assert isinstance(keeping, ProbeSettings)
