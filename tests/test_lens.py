"""The logit lens against hand computations: per-layer norm (trap 3), bias, soft-capping,
float64 option probabilities (trap 7), full-vocabulary mass, bf16 models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import build_tiny

from calibrate.core.option_scores import option_mass, option_probabilities
from calibrate.engine.hooks import capture_last_position
from calibrate.engine.lens import LogitLens
from calibrate.model.adapters import get_adapter
from calibrate.model.load import wrap_model

VOCAB = 40
IDS = torch.tensor([[4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15]])
OPTIONS = torch.tensor([[30, 31, 32], [33, 34, -1]])


def randomized(model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny model whose final norm (weight, bias) and lm_head bias are random, not 1/0."""
    model = build_tiny(model_type, VOCAB, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    adapter = get_adapter(model)
    with torch.no_grad():
        for param in adapter.final_norm.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5 + 1.0)
        if adapter.unembed_bias is not None:
            adapter.unembed_bias.copy_(torch.randn(adapter.unembed_bias.shape, generator=gen))
    return wrap_model(model.to(dtype), None, name=f"tiny-{model_type}")


def residuals(loaded, ids: torch.Tensor = IDS) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's last-position residual [B, L+1, H] and the model's own last logits [B, V]."""
    with torch.no_grad(), capture_last_position(loaded.adapter) as store:
        logits = loaded.model(ids).logits[:, -1]
    return torch.stack(store, dim=1), logits


def hand_norm(model_type: str, norm, x: torch.Tensor, scale_from: torch.Tensor | None = None):
    """RMSNorm / LayerNorm written out from the weights and eps, in float64.

    ``scale_from`` supplies the statistics (the buggy variant passes the final layer's residual).
    """
    x = x.double()
    stats = x if scale_from is None else scale_from.double().expand_as(x)
    if model_type == "llama":
        eps = norm.variance_epsilon
        rms = torch.sqrt(stats.pow(2).mean(-1, keepdim=True) + eps)
        return x / rms * norm.weight.double()
    assert model_type == "phi"
    eps = norm.eps
    mean = stats.mean(-1, keepdim=True)
    var = stats.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * norm.weight.double() + norm.bias.double()


def per_layer_norm_is_correct(model_type: str, norm, stacked: torch.Tensor, normed: torch.Tensor):
    """The check that catches trap 3: each layer normalized with its own statistics."""
    expected = hand_norm(model_type, norm, stacked)
    torch.testing.assert_close(normed.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "phi"])
def test_final_norm_is_recomputed_per_layer(model_type):
    loaded = randomized(model_type)
    lens = LogitLens(loaded.adapter)
    stacked, _ = residuals(loaded)
    # real residuals, plus the same residuals at very different scales per layer
    scales = torch.logspace(-2, 2, stacked.shape[1]).view(1, -1, 1)
    for x in (stacked, stacked * scales):
        normed = lens.normalize(x)
        assert normed.dtype == torch.float32 and normed.shape == x.shape
        per_layer_norm_is_correct(model_type, loaded.adapter.final_norm, x, normed)
        for layer in range(x.shape[1]):  # the same as the model's own norm on that layer alone
            torch.testing.assert_close(normed[:, layer], loaded.adapter.final_norm(x[:, layer]),
                                       rtol=1e-5, atol=1e-5)

    # the buggy variant (reusing the final layer's scale for every layer) is caught by the check
    x = stacked * scales
    buggy = hand_norm(model_type, loaded.adapter.final_norm, x, scale_from=x[:, -1:]).float()
    torch.testing.assert_close(buggy[:, -1], lens.normalize(x)[:, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):
        per_layer_norm_is_correct(model_type, loaded.adapter.final_norm, x, buggy)
    buggy_real = hand_norm(model_type, loaded.adapter.final_norm, stacked,
                           scale_from=stacked[:, -1:]).float()
    with pytest.raises(AssertionError):
        per_layer_norm_is_correct(model_type, loaded.adapter.final_norm, stacked, buggy_real)


def test_lens_norm_is_a_detached_float32_copy():
    loaded = randomized("llama")
    lens = LogitLens(loaded.adapter)
    assert lens.norm is not loaded.adapter.final_norm
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in lens.norm.parameters())
    torch.testing.assert_close(lens.norm.weight, loaded.adapter.final_norm.weight)


@pytest.mark.parametrize("model_type", ["llama", "phi", "gemma3_text", "gpt2"])
def test_option_logits_equal_hand_einsum(model_type):
    loaded = randomized(model_type)
    adapter = loaded.adapter
    lens = LogitLens(adapter)
    stacked, model_logits = residuals(loaded)
    normed = lens.normalize(stacked)
    got = lens.option_logits(normed, OPTIONS)
    assert got.shape == (2, stacked.shape[1], 3) and got.dtype == torch.float32

    weight = adapter.unembed_weight.double()
    raw = torch.einsum("blh,vh->blv", normed.double(), weight)
    if model_type == "phi":
        assert adapter.unembed_bias is not None and adapter.unembed_bias.abs().max() > 0.1
        raw = raw + adapter.unembed_bias.double()
    capped = raw
    if model_type == "gemma3_text":
        cap = loaded.model.config.final_logit_softcapping
        assert cap == 0.5 and lens.softcap == 0.5
        capped = torch.tanh(raw / cap) * cap
        assert (capped - raw).abs().max() > 1e-2  # soft-capping matters in this fixture
    for b in range(2):
        for k in range(3):
            token = int(OPTIONS[b, k])
            if token < 0:
                assert got[b, :, k].eq(float("-inf")).all()
                continue
            torch.testing.assert_close(got[b, :, k].double(), capped[b, :, token],
                                       rtol=1e-5, atol=1e-5)
            # trap 1 at the last layer: the lens equals the model's own logits
            torch.testing.assert_close(got[b, -1, k], model_logits[b, token], rtol=1e-5, atol=1e-5)
    if model_type == "gemma3_text":  # without the cap the last layer would not match the model
        assert not torch.allclose(raw[:, -1].float(), model_logits, atol=1e-3)


@pytest.mark.parametrize("model_type", ["llama", "phi", "gemma3_text"])
def test_option_mass_is_full_vocab_softmax(model_type):
    loaded = randomized(model_type)
    lens = LogitLens(loaded.adapter)
    stacked, model_logits = residuals(loaded)
    normed = lens.normalize(stacked)
    ids = torch.tensor([[30, 31, 32], [33, 34, 35]])
    lse = lens.vocab_logsumexp(normed)
    assert lse.shape == (2, stacked.shape[1]) and lse.dtype == torch.float64
    mass = option_mass(lens.option_logits(normed, ids), lse)
    assert mass.dtype == torch.float64
    full = torch.einsum("blh,vh->blv", normed.double(), loaded.adapter.unembed_weight.double())
    if loaded.adapter.unembed_bias is not None:
        full = full + loaded.adapter.unembed_bias.double()
    if lens.softcap is not None:
        full = torch.tanh(full / lens.softcap) * lens.softcap
    probs = torch.softmax(full, dim=-1)
    expected = torch.stack([probs[b][:, ids[b]].sum(-1) for b in range(2)])
    torch.testing.assert_close(mass, expected, rtol=1e-5, atol=1e-9)
    final = torch.softmax(model_logits.double(), -1)
    torch.testing.assert_close(mass[:, -1], torch.stack([final[b, ids[b]].sum() for b in range(2)]),
                               rtol=1e-5, atol=1e-9)
    every = torch.arange(VOCAB).expand(2, VOCAB)  # every token an option: the mass is 1
    torch.testing.assert_close(option_mass(lens.option_logits(normed, every), lse),
                               torch.ones_like(mass), rtol=0, atol=1e-6)


def test_vocab_logsumexp_chunks_agree(monkeypatch):
    loaded = randomized("phi")
    lens = LogitLens(loaded.adapter)
    normed = lens.normalize(residuals(loaded)[0])
    whole = lens.vocab_logsumexp(normed)
    monkeypatch.setattr(lens, "vocab_chunk", 7)  # 40 rows: chunks of 7, the last one short
    torch.testing.assert_close(lens.vocab_logsumexp(normed), whole, rtol=1e-12, atol=1e-6)


def test_option_mass_ignores_missing_options():
    logits = torch.tensor([[0.0, 1.0, float("-inf")]], dtype=torch.float64)
    mass = option_mass(logits, torch.tensor([math.log(10.0)], dtype=torch.float64))
    assert float(mass[0]) == pytest.approx((1 + math.e) / 10, rel=1e-12)


def test_option_probabilities_float64_beyond_float32_saturation():
    logits = np.array([[0.0, 20.0]], dtype=np.float32)
    assert torch.softmax(torch.from_numpy(logits), -1)[0, 1].item() == 1.0  # float32 saturates
    p = option_probabilities(logits)
    assert p.dtype == np.float64
    assert p[0, 1] < 1.0 and p[0, 0] > 0.0
    assert p[0, 0] == pytest.approx(math.exp(-20) / (1 + math.exp(-20)), rel=1e-12)
    assert 1.0 - p[0, 1] == pytest.approx(math.exp(-20) / (1 + math.exp(-20)), rel=1e-6)


def test_option_probabilities_rows_and_missing_slots():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=10, size=(5, 7, 4)).astype(np.float32)
    logits[1, :, 3] = -np.inf
    logits[4, :, 2:] = -np.inf
    p = option_probabilities(logits)
    assert p.shape == logits.shape
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=0, atol=1e-12)
    assert np.all(p[1, :, 3] == 0.0) and np.all(p[4, :, 2:] == 0.0)
    x = logits.astype(np.float64)
    ref = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    np.testing.assert_allclose(p, ref, rtol=1e-12, atol=1e-300)
    shifted = option_probabilities(logits + np.float32(1000.0))  # no overflow
    assert np.all(np.isfinite(shifted))


def test_lens_on_bf16_model_outputs_float32():
    loaded = randomized("llama", dtype=torch.bfloat16)
    adapter = loaded.adapter
    assert adapter.unembed_weight.dtype == torch.bfloat16
    with torch.no_grad():  # realistic logit magnitudes (~10), where bf16 rounding shows
        adapter.unembed_weight.mul_(20)
    lens = LogitLens(adapter)
    stacked, model_logits = residuals(loaded)
    assert stacked.dtype == torch.bfloat16
    normed = lens.normalize(stacked)
    assert normed.dtype == torch.float32
    logits = lens.option_logits(normed, OPTIONS)
    assert logits.dtype == torch.float32
    ref_normed = lens.norm(stacked.float())
    torch.testing.assert_close(normed, ref_normed, rtol=0, atol=0)
    rows = adapter.unembed_weight.float()
    for b in range(2):
        ids = OPTIONS[b][OPTIONS[b] >= 0]
        torch.testing.assert_close(logits[b, :, : len(ids)], ref_normed[b] @ rows[ids].T,
                                   rtol=1e-5, atol=1e-4)
    # the model itself runs in bf16: the last layer agrees to bf16 precision only
    torch.testing.assert_close(logits[0, -1], model_logits[0, OPTIONS[0]].float(),
                               rtol=0.05, atol=0.3)
    # the full-vocabulary normalizer is consistent with the float32 option logits
    every = torch.arange(VOCAB).expand(2, VOCAB)
    mass = option_mass(lens.option_logits(normed, every), lens.vocab_logsumexp(normed))
    torch.testing.assert_close(mass, torch.ones_like(mass), rtol=0, atol=1e-6)
    probs = option_probabilities(logits.numpy())
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-12)
