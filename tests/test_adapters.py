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


# ---------------------------------------------------------------- MLP neurons, the final norm

def _hand_mlp(model: nn.Module, model_type: str, i: int) -> tuple[nn.Module, nn.Module | None]:
    """(output projection, post-MLP norm) of block index i, by hand per architecture."""
    if model_type == "phi":
        return model.model.layers[i].mlp.fc2, None
    if model_type == "gpt2":
        return model.transformer.h[i].mlp.c_proj, None
    if model_type == "gpt_neox":
        return model.gpt_neox.layers[i].mlp.dense_4h_to_h, None
    if model_type == "opt":
        return model.model.decoder.layers[i].fc2, None
    layer = model.model.layers[i]
    post = layer.post_feedforward_layernorm if model_type in ("gemma2", "gemma3_text") else None
    return layer.mlp.down_proj, post


@pytest.mark.parametrize("model_type", SUPPORTED_ARCHITECTURES)
def test_mlp_parts_are_the_models_own_modules(model_type):
    from calibrate.model.adapters import mlp_parts

    model = build_tiny(model_type, 20)
    adapter = get_adapter(model)
    for block in (1, 3):
        parts = mlp_parts(adapter, block)
        down, post = _hand_mlp(model, model_type, block - 1)
        assert parts.down is down and parts.post_norm is post
        assert parts.out_weight.shape == (parts.width, 32)
        with torch.no_grad():  # row i: what one unit of activation i writes
            one = torch.zeros(1, parts.width)
            one[0, 4] = 1.0
            written = down(one) - down(torch.zeros(1, parts.width))
        torch.testing.assert_close(parts.out_weight[4], written[0])
    with pytest.raises(ValueError, match="outside 1..3"):
        mlp_parts(adapter, 0)


@pytest.mark.parametrize("model_type", SUPPORTED_ARCHITECTURES)
def test_the_final_norm_as_an_affine_map_equals_the_module(model_type):
    """gain * centre(x) / scale(x) + bias is the final norm, with a non-trivial gain and bias."""
    from calibrate.model.adapters import final_norm_affine

    model = build_tiny(model_type, 20)
    adapter = get_adapter(model)
    torch.manual_seed(1)
    with torch.no_grad():
        adapter.final_norm.weight.normal_()
        if getattr(adapter.final_norm, "bias", None) is not None:
            adapter.final_norm.bias.normal_()
    affine = final_norm_affine(adapter)
    assert affine.centre == (model_type in ("phi", "gpt2", "gpt_neox", "opt"))
    x = torch.randn(5, 32) * 3
    got = affine.linear(x) / affine.scale(x) + (0.0 if affine.bias is None else affine.bias)
    torch.testing.assert_close(got, adapter.final_norm(x), rtol=1e-5, atol=1e-5)


def test_opt_with_its_layer_norm_after_the_residual_has_no_neuron_write():
    from calibrate.model.adapters import UnsupportedMLP, mlp_parts

    model = build_tiny("opt", 20)
    adapter = get_adapter(model)
    adapter.blocks[2].do_layer_norm_before = False
    with pytest.raises(UnsupportedMLP, match="do_layer_norm_before"):
        mlp_parts(adapter, 3)
