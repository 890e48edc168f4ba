"""Upper blocks on the prefix cache against full forward passes: unedited residuals reproduced,
an edited last position equals a full pass with the edit hooked in, gradients equal finite
differences, the cache and the blocks are left as they were."""

from __future__ import annotations

import pytest
import torch

from calibrate.engine.hooks import capture_last_position, edit_residual
from calibrate.engine.probe import left_pad, position_ids
from calibrate.engine.upper import prefix_states, upper_forward

SENTENCES = ["the movie was great", "a very boring film is not good , it was bad", "fun movie"]


def batch(tokenizer):
    return left_pad([tokenizer(s)["input_ids"] for s in SENTENCES], tokenizer.pad_token_id)


def full_pass(loaded, ids, mask, layer=None, vec=None):
    """Last-position residuals [B, L+1, H] of one full forward pass, with ``vec`` added to the
    last position at ``layer`` when given."""
    def add(_l, h):
        return torch.cat([h[:, :-1], h[:, -1:] + vec[:, None]], 1)
    with torch.no_grad(), capture_last_position(loaded.adapter) as store:
        edits = edit_residual(loaded.adapter, [layer], add) if vec is not None else None
        if edits:
            edits.__enter__()
        try:
            loaded.adapter.backbone(input_ids=ids, attention_mask=mask,
                                    position_ids=position_ids(mask), use_cache=False)
        finally:
            if edits:
                edits.__exit__(None, None, None)
    return torch.stack(store, 1)


def test_unedited_upper_pass_reproduces_every_layer(tiny):
    ids, mask = batch(tiny.tokenizer)
    state = prefix_states(tiny, ids, mask)
    torch.testing.assert_close(state.residuals, full_pass(tiny, ids, mask), rtol=1e-5, atol=1e-5)
    rows = torch.tensor([2, 0, 1, 1])
    for start in range(tiny.adapter.num_blocks + 1):
        with torch.no_grad():
            out = upper_forward(tiny, state, start, state.residuals[rows, start], rows)
        torch.testing.assert_close(out, state.residuals[rows, start:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("start", [0, 1, 2, 3])
def test_edited_last_position_equals_a_full_pass_with_the_edit(tiny, start):
    ids, mask = batch(tiny.tokenizer)
    state = prefix_states(tiny, ids, mask)
    vec = torch.randn(len(SENTENCES), state.residuals.shape[-1], generator=torch.Generator().manual_seed(1))
    rows = torch.arange(len(SENTENCES))
    with torch.no_grad():
        out = upper_forward(tiny, state, start, state.residuals[:, start] + vec, rows)
    reference = full_pass(tiny, ids, mask, start, vec)
    torch.testing.assert_close(out, reference[:, start:], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out[:, -1], state.residuals[:, -1], atol=1e-3)  # the edit mattered


def test_cache_blocks_and_hooks_are_left_as_they_were(tiny):
    ids, mask = batch(tiny.tokenizer)
    state = prefix_states(tiny, ids, mask)
    keys = [layer.keys.clone() for layer in state.cache.layers]
    blocks = tiny.adapter.blocks
    owner_blocks = list(blocks)
    with torch.no_grad():
        upper_forward(tiny, state, 1, state.residuals[:, 1] * 2, torch.arange(3))
    assert [torch.equal(a, layer.keys) for a, layer in zip(keys, state.cache.layers)] == [True] * len(keys)
    assert list(tiny.adapter.blocks) == owner_blocks and len(blocks) == tiny.adapter.num_blocks
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in blocks)


def test_blocks_restored_when_a_block_raises(tiny):
    ids, mask = batch(tiny.tokenizer)
    state = prefix_states(tiny, ids, mask)
    blocks = list(tiny.adapter.blocks)

    def boom(_l, _h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), edit_residual(tiny.adapter, [2], boom):
        upper_forward(tiny, state, 1, state.residuals[:, 1], torch.arange(3))
    # the backbone runs every block again: a full pass still reproduces the prefix state
    assert list(tiny.adapter.blocks) == blocks
    torch.testing.assert_close(full_pass(tiny, ids, mask), state.residuals, rtol=1e-5, atol=1e-5)
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in blocks)


def test_gradient_in_the_injected_residual_equals_finite_differences(word_tokenizer):
    from conftest import build_tiny

    from calibrate.model.load import wrap_model

    loaded = wrap_model(build_tiny("llama", len(word_tokenizer)).double(), word_tokenizer, name="f64")
    ids, mask = batch(word_tokenizer)
    state = prefix_states(loaded, ids, mask)
    rows, start = torch.arange(3), 1
    base = state.residuals[:, start].clone()
    weight = torch.randn(base.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def objective(hidden):
        return (upper_forward(loaded, state, start, hidden, rows)[:, -1] @ weight).sum()

    hidden = base.clone().requires_grad_(True)
    objective(hidden).backward()
    # Llama's RMSNorm computes in float32 even in a float64 model: a step of 1e-3 keeps the
    # rounding (~1e-4 relative) and the O(step^2) truncation error below the tolerance
    step, (r, h) = 1e-3, (1, 5)
    plus, minus = base.clone(), base.clone()
    plus[r, h] += step
    minus[r, h] -= step
    with torch.no_grad():
        numeric = (objective(plus) - objective(minus)) / (2 * step)
    assert hidden.grad[r, h].item() == pytest.approx(numeric.item(), rel=1e-3)
    assert hidden.grad.abs().sum() > 0


def test_start_outside_the_model_is_refused(tiny):
    ids, mask = batch(tiny.tokenizer)
    state = prefix_states(tiny, ids, mask)
    with pytest.raises(ValueError, match="start layer 9 outside 0..3"):
        upper_forward(tiny, state, 9, state.residuals[:, 0], torch.arange(3))


@pytest.mark.parametrize("window", [4, 64])
@pytest.mark.parametrize("start", [0, 1, 2, 3])
def test_mixed_layer_types_keep_their_own_mask_and_rotary(word_tokenizer, start, window):
    """Gemma-3 picks each block's mask and rotary base by its index in the block list
    (``config.layer_types[i]``): the upper slice must still give block l the type of layer l
    (sliding with base 1e4, full with base 1e6). Window 4 is below the prompt length (the masks
    differ too); window 64 is above it (only the rotary base differs: a silent wrong number)."""
    from conftest import build_tiny
    from transformers import AutoModelForCausalLM

    from calibrate.model.load import wrap_model

    config = build_tiny("gemma3_text", len(word_tokenizer)).config
    config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    config.sliding_window = window
    torch.manual_seed(0)
    loaded = wrap_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(),
                        word_tokenizer, name="tiny-gemma3-mixed")
    ids, mask = batch(word_tokenizer)
    state = prefix_states(loaded, ids, mask)
    vec = torch.randn(len(SENTENCES), state.residuals.shape[-1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = upper_forward(loaded, state, start, state.residuals[:, start] + vec,
                            torch.arange(len(SENTENCES)))
    torch.testing.assert_close(out, full_pass(loaded, ids, mask, start, vec)[:, start:],
                               rtol=1e-4, atol=1e-4)
    assert loaded.model.config.layer_types == ["full_attention", "sliding_attention",
                                               "full_attention"]
