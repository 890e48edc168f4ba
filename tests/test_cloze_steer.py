"""Cloze steering on one context pass against a full cloze pass per variant with the edit hooked
into the context: every layer, every option, at and above the edited layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibrate.engine.cloze import run_cloze, run_cloze_steered
from calibrate.engine.edits import DirectionSweep, Steering
from calibrate.engine.probe import ProbeSettings
from calibrate.tasks.continuations import build_requests

CONTEXTS = ["question : the movie was great ? answer :", "question : is this a film ? answer :",
            "the movie", "a very boring film . question : good or bad ? answer :", "fun"]
OPTIONS = [["very good fun", "bad", "not very good ."], ["yes", "no no"],
           ["was fun", "film", "is not very very good , it was bad", "the"],
           ["good", "very bad", "very good", "very good fun , not bad"], ["yes", "no"]]
QUIET = ProbeSettings(progress=False)


def requests(tokenizer):
    return build_requests(tokenizer, CONTEXTS, OPTIONS)


def vector(tiny, seed=0):
    hidden = tiny.adapter.unembed_weight.shape[1]
    vec = np.random.default_rng(seed).standard_normal(hidden)
    return vec / np.linalg.norm(vec)


@pytest.mark.parametrize("layers", [(1,), (3,), (0, 2), (2, 3)])
def test_one_context_pass_equals_a_full_pass_per_eta(tiny, layers):
    reqs = requests(tiny.tokenizer)
    steering = Steering(vector(tiny), layers, (0.0, 2.0, -4.0))
    fast = run_cloze_steered(tiny, reqs, steering, QUIET, use_cache=True)
    full = run_cloze_steered(tiny, reqs, steering, QUIET, use_cache=False)
    assert fast.shape == full.shape == (3, len(CONTEXTS), 4, 4)
    np.testing.assert_allclose(fast, full, rtol=1e-4, atol=1e-4)
    assert not np.allclose(fast[2, :, -1], fast[0, :, -1], atol=1e-3)  # the edit did something
    # below the lowest edited layer nothing moves
    np.testing.assert_array_equal(fast[2, :, :min(layers)], fast[0, :, :min(layers)])


def test_eta_zero_equals_the_cloze_probe(tiny):
    reqs = requests(tiny.tokenizer)
    labels = np.zeros(len(reqs), dtype=int)
    probe = run_cloze(tiny, reqs, labels, QUIET, norm="token")
    fast = run_cloze_steered(tiny, reqs, Steering(vector(tiny), (2,), (0.0, 3.0)), QUIET, "token")
    np.testing.assert_allclose(fast[0], probe.option_logits, rtol=1e-5, atol=1e-5)


def test_many_directions_in_small_passes_equal_one_pass(tiny, monkeypatch):
    """Variants split across several upper passes (a tiny token budget) give the same scores."""
    from calibrate.engine import cloze_steer

    reqs = requests(tiny.tokenizer)
    vectors = np.stack([vector(tiny, s) for s in range(3)])
    sweep = DirectionSweep(vectors, (2,), (0.0, 1.0, 5.0))
    one = cloze_steer.cloze_loglik_steered(tiny, reqs, sweep, QUIET)
    monkeypatch.setattr(cloze_steer, "variants_per_pass", lambda *a: 1)
    many = cloze_steer.cloze_loglik_steered(tiny, reqs, sweep, QUIET)
    np.testing.assert_allclose(one, many, rtol=1e-6, atol=1e-6)
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in tiny.adapter.blocks)


def test_blocks_and_hooks_restored_after_an_error(tiny, monkeypatch):
    reqs = requests(tiny.tokenizer)
    blocks = list(tiny.adapter.blocks)

    class Boom(Steering):
        def apply(self, layer, hidden, variant):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_cloze_steered(tiny, reqs, Boom(vector(tiny), (1, 2), (0.0, 1.0)), QUIET)
    assert list(tiny.adapter.blocks) == blocks
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in blocks)
    torch.testing.assert_close(  # the model still computes what it did
        torch.as_tensor(run_cloze(tiny, reqs, np.zeros(5, dtype=int), QUIET).option_logits),
        torch.as_tensor(run_cloze_steered(tiny, reqs, Steering(vector(tiny), (1,), (0.0,)),
                                          QUIET, use_cache=False)[0]), rtol=1e-5, atol=1e-5)


def test_tails_run_in_groups_of_similar_width(tiny):
    """Short and long options run in separate groups (the equality tests above cover them)."""
    from calibrate.engine.cloze_steer import _Tails

    tails = _Tails(tiny, requests(tiny.tokenizer), QUIET)
    assert len(tails.groups) > 1
    assert sorted(torch.cat(tails.groups).tolist()) == list(range(len(tails.conts)))
    for group in tails.groups:  # no group pads a one-token tail to the longest
        widths = [tails.widths[r] for r in group.tolist()]
        assert max(widths) - min(widths) < tails.width - 1
