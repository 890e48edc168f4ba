"""Steering against references: eta=0 equals the probe, the key/value path equals a full steered
forward, earlier positions stay untouched, hooks go away on errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from calibrate.core.deltas import steering_table
from calibrate.engine.edits import Steering, SteeringError, check_steering, residual_norms
from calibrate.engine.hooks import edit_residual
from calibrate.engine.probe import ProbeSettings, run_probe
from calibrate.engine.steer import run_steered
from calibrate.tasks.prompts import PromptConfig, build_prompts

DATASET = PromptConfig(name="toy", answer_format="verbalizer", verbalizer=[" negative", " positive"],
                       template="{question} \n question : is this sentence positive or negative ? "
                                "answer :")
SENTENCES = ["the movie was great", "a very boring film", "this film is not good , it was bad",
             "fun", "the the the movie was very very fun and good good"]


def prompt_set(tokenizer):
    recs = [SimpleNamespace(question=s, options=("bad", "good"), label=i % 2, subject="")
            for i, s in enumerate(SENTENCES)]
    return build_prompts(recs, DATASET, tokenizer)


def steering(hidden, layers, etas=(0.0, 1.5, -3.0), position="last", seed=0):
    vec = np.random.default_rng(seed).standard_normal(hidden)
    return Steering(vec / np.linalg.norm(vec), tuple(layers), tuple(etas), position)


def hidden_of(tiny):
    return tiny.adapter.unembed_weight.shape[1]


def test_eta_zero_equals_unsteered_probe(tiny):
    ps = prompt_set(tiny.tokenizer)
    base = run_probe(tiny, ps, ProbeSettings(progress=False))
    steered = run_steered(tiny, ps, steering(hidden_of(tiny), [2]), ProbeSettings(progress=False))
    np.testing.assert_allclose(steered[0], base.option_logits, rtol=1e-5, atol=1e-5)


def test_cached_path_equals_full_forward(tiny):
    ps = prompt_set(tiny.tokenizer)
    s = steering(hidden_of(tiny), [1, 3])
    cached = run_steered(tiny, ps, s, ProbeSettings(progress=False), use_cache=True)
    full = run_steered(tiny, ps, s, ProbeSettings(progress=False), use_cache=False)
    np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)
    assert not np.allclose(cached[1], cached[0], atol=1e-4)  # steering did something


def test_steering_changes_only_layers_at_and_after_the_edit(tiny):
    ps = prompt_set(tiny.tokenizer)
    out = run_steered(tiny, ps, steering(hidden_of(tiny), [2], etas=(0.0, 5.0)),
                      ProbeSettings(progress=False))
    np.testing.assert_allclose(out[1][:, :2], out[0][:, :2], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[1][:, 2:], out[0][:, 2:], atol=1e-4)


def test_last_position_edit_leaves_earlier_positions_untouched(tiny):
    enc = tiny.tokenizer("the movie was great answer :", return_tensors="pt")
    vec = torch.randn(hidden_of(tiny))
    with torch.no_grad():
        plain = tiny.model(**enc, output_hidden_states=True).hidden_states
        with edit_residual(tiny.adapter, [1], lambda _l, h: torch.cat([h[:, :-1], h[:, -1:] + vec], 1)):
            edited = tiny.model(**enc, output_hidden_states=True).hidden_states
    for layer in range(1, len(plain) - 1):
        torch.testing.assert_close(edited[layer][:, :-1], plain[layer][:, :-1])
    torch.testing.assert_close(edited[1][:, -1], plain[1][:, -1] + vec)


def test_all_positions_differs_from_last_position(tiny):
    ps = prompt_set(tiny.tokenizer)
    h = hidden_of(tiny)
    last = run_steered(tiny, ps, steering(h, [1], etas=(0.0, 4.0)), ProbeSettings(progress=False))
    every = run_steered(tiny, ps, steering(h, [1], etas=(0.0, 4.0), position="all"),
                        ProbeSettings(progress=False))
    np.testing.assert_allclose(every[0], last[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(every[1], last[1], atol=1e-4)


def test_hooks_removed_when_forward_raises(tiny):
    blocks = tiny.adapter.blocks

    def boom(_layer, _hidden):
        raise RuntimeError("boom")

    enc = tiny.tokenizer("the movie", return_tensors="pt")
    with pytest.raises(RuntimeError, match="boom"):
        with edit_residual(tiny.adapter, [0, 2], boom):
            tiny.model(**enc)
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in blocks)


def test_residual_norm_scaling_multiplies_eta(tiny):
    ps = prompt_set(tiny.tokenizer)
    h = hidden_of(tiny)
    base = steering(h, [2], etas=(0.0, 2.0))
    scaled = Steering(base.vector, base.layers, (0.0, 1.0), layer_scale={2: 2.0})
    a = run_steered(tiny, ps, base, ProbeSettings(progress=False))
    b = run_steered(tiny, ps, scaled, ProbeSettings(progress=False))
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-5)
    assert residual_norms({2: np.array([[3.0, 4.0], [0.0, 1.0]])}, [2]) == {2: 3.0}


def test_steering_table_deltas_and_changed():
    logits = np.zeros((2, 4, 2, 2), dtype=np.float32)
    logits[0, :, :, 1] = 1.0   # eta 0: predicts option 1 everywhere
    logits[1, :2, :, 0] = 3.0  # eta 2: first two examples flip to option 0
    logits[1, 2:, :, 1] = 1.0
    labels = np.array([1, 1, 1, 0])
    table = steering_table(logits, labels, [0.0, 2.0], n_bins=15, binning="guo", reference=0)
    assert list(table.columns[:2]) == ["eta", "layer"]
    final = table[(table.eta == 2.0) & (table.layer == 1)].iloc[0]
    assert final["changed"] == pytest.approx(0.5)
    assert final["delta_accuracy"] == pytest.approx(0.25 - 0.75)
    assert table[table.eta == 0.0]["delta_ece"].abs().max() == 0.0


def test_check_steering_errors():
    assert check_steering([3], 4, "last", "absolute") == [3]
    with pytest.raises(SteeringError, match=r"0\.\.3"):
        check_steering([4], 4, "last", "absolute")
    with pytest.raises(SteeringError, match="position='middle'"):
        check_steering([1], 4, "middle", "absolute")
    with pytest.raises(SteeringError, match="eta_scale='x'"):
        check_steering([1], 4, "last", "x")
