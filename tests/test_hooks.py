"""Residual hooks: capture and edit, tuple and tensor block outputs (trap 2), always removed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from calibrate.engine.hooks import capture_last_position, edit_residual
from calibrate.model.adapters import Adapter

HIDDEN, VOCAB = 6, 11


class TupleBlock(nn.Module):
    """A transformers-4.x-style block: returns ``(hidden, attention)``; can be made to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(HIDDEN, HIDDEN)
        self.fail = False

    def forward(self, hidden_states, attention_mask=None):
        if self.fail:
            raise RuntimeError("block failed")
        return hidden_states + torch.tanh(self.lin(hidden_states)), "attention-weights"


class ToyLM(nn.Module):
    """Embedding, three tuple-returning blocks, a final norm and an unembedding."""

    def __init__(self, keyword: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(TupleBlock() for _ in range(3))
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.keyword = keyword  # pass hidden_states by keyword (the pre-hook's kwargs path)

    def residuals(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's residual [B, T, H], computed without hooks (the reference)."""
        out = [self.embed(ids)]
        for block in self.layers:
            out.append(block(out[-1])[0])
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        for block in self.layers:
            hidden = (block(hidden_states=hidden, attention_mask=None) if self.keyword
                      else block(hidden, None))[0]
        return self.head(self.norm(hidden))


def toy_adapter(model: ToyLM) -> Adapter:
    return Adapter("toy", model.layers, model.norm, model.head, model, None)


def hook_state(blocks) -> list[tuple[list[int], list[int]]]:
    """The ids of every forward and pre-forward hook of each block."""
    return [(list(b._forward_hooks), list(b._forward_pre_hooks)) for b in blocks]


def assert_no_hooks(blocks, before=None) -> None:
    """No hook of ours is left: none at all, or exactly the ones present ``before``.

    (transformers installs its own persistent output-capturing hooks the first time a model is
    run with ``output_hidden_states=True``; those are not ours.)
    """
    expected = before if before is not None else [([], [])] * len(blocks)
    assert hook_state(blocks) == expected


IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


@pytest.mark.parametrize("keyword", [False, True])
def test_capture_with_tuple_blocks(keyword):
    model = ToyLM(keyword)
    with torch.no_grad():
        reference = model.residuals(IDS)
        with capture_last_position(toy_adapter(model)) as store:
            model(IDS)
    assert len(store) == len(model.layers) + 1
    for layer, (got, ref) in enumerate(zip(store, reference, strict=True)):
        assert got.shape == (2, HIDDEN), layer
        torch.testing.assert_close(got, ref[:, -1], rtol=0, atol=0)
        assert not got.requires_grad
    assert_no_hooks(model.layers)


def test_capture_is_detached_with_grad_enabled():
    model = ToyLM()
    with capture_last_position(toy_adapter(model)) as store:
        model(IDS).sum().backward()
    assert all(not t.requires_grad for t in store)


def test_capture_on_real_tiny_models(tiny):
    ids = tiny.tokenizer(["the movie was great", "a boring film ."], padding=True,
                         return_tensors="pt")
    with torch.no_grad():
        tiny.model(**ids, output_hidden_states=True)  # let transformers install its own hooks
    before = hook_state(tiny.adapter.blocks)
    with torch.no_grad():
        with capture_last_position(tiny.adapter) as store:
            out = tiny.model(**ids, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(store) == tiny.adapter.num_blocks + 1 == len(hidden)
    for layer in range(len(store) - 1):
        torch.testing.assert_close(store[layer], hidden[layer][:, -1], rtol=1e-6, atol=1e-6)
    # HF's last entry is after the final norm (trap 1); ours is before it
    torch.testing.assert_close(tiny.adapter.final_norm(store[-1]), hidden[-1][:, -1],
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(store[-1], hidden[-1][:, -1], atol=1e-3)
    assert_no_hooks(tiny.adapter.blocks, before)


def test_capture_hooks_removed_when_forward_raises():
    model = ToyLM()
    model.layers[1].fail = True
    with pytest.raises(RuntimeError, match="block failed"):
        with capture_last_position(toy_adapter(model)) as store:
            model(IDS)
    assert len(store) == 2  # layer 0 and the output of block 1 were read before the failure
    assert_no_hooks(model.layers)


def test_capture_hooks_removed_on_real_model_error(tiny):
    with pytest.raises(ValueError, match="stop"):
        with capture_last_position(tiny.adapter):
            with torch.no_grad():
                tiny.model(torch.tensor([[4, 5, 6]]))
            raise ValueError("stop")
    assert_no_hooks(tiny.adapter.blocks)


def run_captured(model, adapter, ids, edit_layers=(), vector=None, edit_first=True):
    """Residuals at the last position, optionally with ``vector`` added at ``edit_layers``."""
    calls = []

    def edit(layer, hidden):
        calls.append(layer)
        return hidden + vector

    with torch.no_grad():
        editing = edit_residual(adapter, list(edit_layers), edit)
        if edit_first:
            with editing, capture_last_position(adapter) as st:
                model(ids)
        else:
            with capture_last_position(adapter) as st, editing:
                model(ids)
    return st, calls


@pytest.mark.parametrize("keyword", [False, True])
@pytest.mark.parametrize("layer", [0, 1, 2, 3])
@pytest.mark.parametrize("edit_first", [True, False])
def test_edit_residual_toy(layer, keyword, edit_first):
    model = ToyLM(keyword)
    adapter = toy_adapter(model)
    vector = torch.linspace(-1, 1, HIDDEN)
    clean, _ = run_captured(model, adapter, IDS)
    edited, calls = run_captured(model, adapter, IDS, [layer], vector, edit_first)
    assert calls == [layer]
    for earlier in range(layer):
        assert torch.equal(edited[earlier], clean[earlier])
    assert torch.equal(edited[layer], clean[layer] + vector)
    for later in range(layer + 1, len(clean)):
        assert not torch.allclose(edited[later], clean[later])
    assert_no_hooks(model.layers)
    again, _ = run_captured(model, adapter, IDS)
    assert all(torch.equal(a, c) for a, c in zip(again, clean, strict=True))


def test_edit_residual_real_tiny(tiny):
    adapter, model = tiny.adapter, tiny.model
    ids = torch.tensor([[4, 5, 6, 7, 8]])
    clean, _ = run_captured(model, adapter, ids)
    vector = torch.randn(clean[0].shape[-1], generator=torch.Generator().manual_seed(1))
    for layer in (0, 2, adapter.num_blocks):
        edited, calls = run_captured(model, adapter, ids, [layer], vector)
        assert calls == [layer]
        for earlier in range(layer):
            torch.testing.assert_close(edited[earlier], clean[earlier], rtol=0, atol=1e-7)
        torch.testing.assert_close(edited[layer], clean[layer] + vector, rtol=1e-6, atol=1e-6)
        if layer < adapter.num_blocks:
            assert not torch.allclose(edited[layer + 1], clean[layer + 1])
    assert_no_hooks(adapter.blocks)
    with torch.no_grad():
        with edit_residual(adapter, [adapter.num_blocks], lambda _l, h: h + vector):
            edited_logits = model(ids).logits[0, -1]
        clean_logits = model(ids).logits[0, -1]
    assert not torch.allclose(edited_logits, clean_logits)  # the edit reaches the output


def test_edit_residual_several_layers_and_removal_on_error():
    model = ToyLM()
    adapter = toy_adapter(model)
    vector = torch.ones(HIDDEN)
    clean, _ = run_captured(model, adapter, IDS)
    edited, calls = run_captured(model, adapter, IDS, [0, 2], vector)
    assert calls == [0, 2]
    assert torch.equal(edited[0], clean[0] + vector)
    assert not torch.allclose(edited[1], clean[1])
    model.layers[2].fail = True
    with pytest.raises(RuntimeError, match="block failed"):
        with edit_residual(adapter, [0, 1, 3], lambda _l, h: h + vector):
            model(IDS)
    assert_no_hooks(model.layers)
