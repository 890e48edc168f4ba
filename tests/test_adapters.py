"""Architecture adapters: the model's own modules, explicit per model_type (traps 2 and 4)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import ARCHITECTURES, build_tiny
from torch import nn

from calibrate.model.adapters import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedArchitecture,
    block_hidden,
    check_supported,
    get_adapter,
    replace_block_hidden,
)


def expected_modules(model: nn.Module, model_type: str) -> tuple[nn.Module, ...]:
    """(backbone, blocks, final norm, unembedding), written out by hand per architecture."""
    if model_type in ("llama", "mistral", "qwen2", "gemma3_text"):
        return model.model, model.model.layers, model.model.norm, model.lm_head
    if model_type == "phi":
        return model.model, model.model.layers, model.model.final_layernorm, model.lm_head
    if model_type == "gpt2":
        return model.transformer, model.transformer.h, model.transformer.ln_f, model.lm_head
    if model_type == "gpt_neox":
        return model.gpt_neox, model.gpt_neox.layers, model.gpt_neox.final_layer_norm, model.lm_head
    if model_type == "opt":
        return (model.model, model.model.decoder.layers, model.model.decoder.final_layer_norm,
                model.lm_head)
    raise AssertionError(model_type)


def test_every_fixture_architecture_is_supported():
    assert set(ARCHITECTURES) <= set(SUPPORTED_ARCHITECTURES)
    assert list(SUPPORTED_ARCHITECTURES) == sorted(SUPPORTED_ARCHITECTURES)


def test_adapter_returns_the_models_own_modules(tiny):
    model, adapter = tiny.model, tiny.adapter
    model_type = model.config.model_type
    backbone, blocks, norm, unembed = expected_modules(model, model_type)
    assert adapter.model_type == model_type
    assert adapter.backbone is backbone
    assert adapter.blocks is blocks
    assert adapter.final_norm is norm
    assert adapter.unembed is unembed
    assert adapter.unembed is model.get_output_embeddings()
    assert adapter.unembed_weight is unembed.weight
    assert adapter.num_blocks == model.config.num_hidden_layers == 3
    assert adapter.unembed_weight.shape == (model.config.vocab_size, 32)


def test_bias_and_softcap_per_architecture(tiny):
    adapter, model_type = tiny.adapter, tiny.model.config.model_type
    if model_type == "phi":
        assert adapter.unembed_bias is not None
        assert adapter.unembed_bias is tiny.model.lm_head.bias
        assert isinstance(adapter.final_norm, nn.LayerNorm)
    else:
        assert adapter.unembed_bias is None
    if model_type == "gemma3_text":
        assert adapter.softcap == 0.5
    else:
        assert adapter.softcap is None


@pytest.mark.parametrize("model_type", ["mamba", "bert", "t5", ""])
def test_unknown_model_type_lists_supported(model_type):
    with pytest.raises(UnsupportedArchitecture) as err:
        check_supported(model_type)
    for name in SUPPORTED_ARCHITECTURES:
        assert name in str(err.value)
    assert repr(model_type) in str(err.value)
    fake = SimpleNamespace(config=SimpleNamespace(model_type=model_type))
    listed = "supported: " + ", ".join(SUPPORTED_ARCHITECTURES)
    with pytest.raises(UnsupportedArchitecture, match=listed):
        get_adapter(fake)


def test_opt_with_project_out_is_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("opt", hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                               num_attention_heads=4, word_embed_proj_dim=16,
                               max_position_embeddings=32, vocab_size=20)
    model = AutoModelForCausalLM.from_config(cfg)
    assert model.model.decoder.project_out is not None
    with pytest.raises(UnsupportedArchitecture, match="project_out"):
        get_adapter(model)


def test_block_hidden_tensor_and_tuple():
    hidden = torch.randn(2, 3, 4)
    assert block_hidden(hidden) is hidden  # transformers 5: a plain tensor
    extra = (torch.ones(1), None)
    assert block_hidden((hidden, *extra)) is hidden  # transformers 4.x: (hidden, attn, cache)


def test_replace_block_hidden_keeps_container_type():
    old, new = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    assert replace_block_hidden(old, new) is new
    attn, cache = torch.full((1,), 7.0), object()
    out = replace_block_hidden((old, attn, cache), new)
    assert isinstance(out, tuple) and len(out) == 3
    assert out[0] is new and out[1] is attn and out[2] is cache
    single = replace_block_hidden((old,), new)
    assert isinstance(single, tuple) and len(single) == 1 and single[0] is new


def test_real_tiny_blocks_return_what_block_hidden_reads(tiny):
    """Whatever a real block returns (tensor in transformers 5), block_hidden gives [B, T, H]."""
    seen = []
    handle = tiny.adapter.blocks[1].register_forward_hook(
        lambda _m, _a, out: seen.append(block_hidden(out)))
    try:
        with torch.no_grad():
            tiny.model(torch.tensor([[4, 5, 6, 7]]))
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].shape == (1, 4, 32)


def test_adapter_is_built_from_model_config_not_attribute_names():
    """A llama model relabelled as an unknown type is refused, although its attributes fit."""
    model = build_tiny("llama", 20)
    model.config.model_type = "llama_custom"
    with pytest.raises(UnsupportedArchitecture):
        get_adapter(model)
