"""Contexts held as a cache of all but their last token: a shared prefix followed by
right-padded suffixes reproduces the whole left-padded contexts at every layer, unedited and
with the last position edited above any layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibrate.engine.context import suffix_contexts, whole_contexts
from calibrate.engine.prefix import SharedPrefix
from calibrate.engine.probe import left_pad
from calibrate.engine.upper import last_states, prefix_states, upper_forward

PREFIX = "question : the movie was great ? answer : yes . question : is it bad ? answer : no ."
SUFFIXES = [" question : fun ? answer :", " a very boring film , not good ? answer : it was bad",
            " no", " the film"]


def _tokens(tokenizer):
    prefix = tokenizer(PREFIX)["input_ids"]
    wholes = [tokenizer(PREFIX + s)["input_ids"] for s in SUFFIXES]
    assert all(w[:len(prefix)] == prefix for w in wholes)  # word-level: no boundary merge
    return prefix, wholes


def test_shared_prefix_equals_whole_contexts_at_every_layer(tiny):
    prefix, wholes = _tokens(tiny.tokenizer)
    shared = SharedPrefix.run(tiny, prefix)
    with torch.inference_mode():
        reused = last_states(tiny, suffix_contexts(tiny, shared, [w[len(prefix):] for w in wholes]))
        ids, mask = left_pad(wholes, tiny.tokenizer.pad_token_id)
        whole = prefix_states(tiny, ids, mask)
    assert reused.last_ids.tolist() == [w[-1] for w in wholes]
    assert reused.last_positions.tolist() == [len(w) - 1 for w in wholes]
    torch.testing.assert_close(reused.residuals, whole.residuals, atol=1e-5, rtol=1e-4)
    # the last position edited at layer 1, then blocks 1.. run on either cache
    vec = torch.randn(len(wholes), reused.residuals.shape[-1], generator=torch.Generator().manual_seed(0))
    rows = torch.arange(len(wholes))
    with torch.inference_mode():
        a = upper_forward(tiny, reused, 1, reused.residuals[:, 1] + vec, rows)
        b = upper_forward(tiny, whole, 1, whole.residuals[:, 1] + vec, rows)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a[:, -1], reused.residuals[:, -1], atol=1e-3)  # the edit moved it


def test_one_token_suffixes_cache_only_the_prefix(tiny):
    prefix, wholes = _tokens(tiny.tokenizer)
    shared = SharedPrefix.run(tiny, prefix)
    one = [[w[len(prefix)]] for w in wholes[:2]]
    context = suffix_contexts(tiny, shared, one)
    assert context.mask.shape == (2, len(prefix)) and bool(context.mask.all())
    assert context.last_positions.tolist() == [len(prefix)] * 2
    # the shared cache itself is never extended: a second use starts from the same prefix
    again = suffix_contexts(tiny, shared, one)
    np.testing.assert_array_equal(again.mask.numpy(), context.mask.numpy())
    assert shared.cache.get_seq_length() == len(prefix)


def test_whole_contexts_of_one_token_cache_nothing(tiny):
    ids, mask = left_pad([[5], [6]], tiny.tokenizer.pad_token_id)
    context = whole_contexts(tiny, ids, mask)
    assert context.cache is None and context.mask.shape == (2, 0)
    with pytest.raises(ValueError, match="cached context"):
        last_states(tiny, context)


def test_an_empty_suffix_is_refused(tiny):
    prefix, _ = _tokens(tiny.tokenizer)
    with pytest.raises(ValueError, match="at least one token"):
        suffix_contexts(tiny, SharedPrefix.run(tiny, prefix), [[4, 5], []])
