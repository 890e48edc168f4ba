"""The translated lens (tuned and affine lenses read through it) and the tuned-lens file format:
zero translators are the logit lens exactly, the last layer is the model's own output whatever
the translators, the format round-trips, and where the ``tuned-lens`` package is installed (the
optional ``tunedlens`` test extra) its own code reads our files and we read its files alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ARCHITECTURES, build_tiny

from calibrate.engine.hooks import capture_last_position
from calibrate.engine.lens import LogitLens
from calibrate.errors import ConfigError
from calibrate.model.load import wrap_model
from calibrate.readouts.translators import (
    CONFIG_FILE,
    PARAMS_FILE,
    TranslatedLens,
    load_lens,
    save_lens,
    unembed_hash,
)

VOCAB = 40
IDS = torch.tensor([[4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15]])


def tiny_lm(model_type: str, seed: int = 0):
    return wrap_model(build_tiny(model_type, VOCAB, seed), None, name=f"tiny-{model_type}")


def random_translators(loaded, scale: float = 0.3, seed: int = 1):
    blocks = loaded.adapter.num_blocks
    hidden = int(loaded.adapter.unembed_weight.shape[1])
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn((blocks, hidden, hidden), generator=gen) * scale / hidden ** 0.5,
            torch.randn((blocks, hidden), generator=gen) * scale)


def residuals(loaded) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's last-position residual [B, L+1, H] and the model's own last logits [B, V]."""
    with torch.no_grad(), capture_last_position(loaded.adapter) as store:
        logits = loaded.model(IDS).logits[:, -1]
    return torch.stack(store, dim=1), logits


ALL_TOKENS = torch.arange(VOCAB).expand(len(IDS), VOCAB)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_zero_translators_read_exactly_as_the_logit_lens(model_type):
    loaded = tiny_lm(model_type)
    blocks = loaded.adapter.num_blocks
    hidden = int(loaded.adapter.unembed_weight.shape[1])
    zero = TranslatedLens(loaded.adapter, torch.zeros(blocks, hidden, hidden),
                          torch.zeros(blocks, hidden), "zero")
    logit = LogitLens(loaded.adapter)
    stacked, _ = residuals(loaded)
    layers = range(blocks + 1)
    assert torch.equal(zero.prepare(stacked, layers), logit.prepare(stacked, layers))
    assert torch.equal(zero.read_layers(stacked, layers, ALL_TOKENS),
                       logit.read_layers(stacked, layers, ALL_TOKENS))
    assert torch.equal(zero.vocab_logsumexp(zero.prepare(stacked, layers)),
                       logit.vocab_logsumexp(logit.prepare(stacked, layers)))


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_the_last_layer_is_the_models_own_output_whatever_the_translators(model_type):
    loaded = tiny_lm(model_type)
    weight, bias = random_translators(loaded)
    lens = TranslatedLens(loaded.adapter, weight, bias, "random")
    stacked, model_logits = residuals(loaded)
    last = loaded.adapter.num_blocks
    read = lens.read_layers(stacked, range(last + 1), ALL_TOKENS)
    torch.testing.assert_close(read[:, -1], model_logits, rtol=1e-5, atol=1e-5)
    # the last layer alone (as steering at the last layer reads it) is the same
    torch.testing.assert_close(lens.read_layers(stacked[:, -1:], [last], ALL_TOKENS)[:, 0],
                               model_logits, rtol=1e-5, atol=1e-5)
    # below it, the logit lens of h + W h + b, written out
    logit = LogitLens(loaded.adapter)
    for layer in range(last):
        h = stacked[:, layer]
        moved = (h + h @ weight[layer].T + bias[layer])[:, None]
        torch.testing.assert_close(read[:, layer], logit.read_layers(moved, [layer], ALL_TOKENS)[:, 0],
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(read[:, layer], logit.read_layers(h[:, None], [layer],
                                                                    ALL_TOKENS)[:, 0])


def test_a_subset_of_layers_reads_each_layer_with_its_own_translator():
    loaded = tiny_lm("llama")
    weight, bias = random_translators(loaded)
    lens = TranslatedLens(loaded.adapter, weight, bias, "random")
    stacked, _ = residuals(loaded)
    full = lens.read_layers(stacked, range(4), ALL_TOKENS)
    torch.testing.assert_close(lens.read_layers(stacked[:, [2, 0, 3]], [2, 0, 3], ALL_TOKENS),
                               full[:, [2, 0, 3]], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="2 layers for 4 residual slices"):
        lens.prepare(stacked, [0, 1])


def test_translators_of_another_shape_are_refused_in_one_line():
    loaded = tiny_lm("llama")
    with pytest.raises(ConfigError, match=r"do not fit this model; accepted: \[3, 32, 32\]"):
        TranslatedLens(loaded.adapter, torch.zeros(2, 32, 32), torch.zeros(2, 32), "x")


# ---------------------------------------------------------------- the file format

def test_the_format_round_trips_with_the_librarys_names(tmp_path):
    loaded = tiny_lm("llama")
    weight, bias = random_translators(loaded)
    save_lens(tmp_path, weight, bias, base_model="org/tiny", unembedding=loaded.adapter.unembed_weight)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    # TunedLensConfig's fields (tuned_lens/nn/lenses.py), nothing else
    assert config == {"base_model_name_or_path": "org/tiny", "d_model": 32,
                      "num_hidden_layers": 3, "bias": True, "base_model_revision": None,
                      "unembed_hash": unembed_hash(loaded.adapter.unembed_weight),
                      "lens_type": "linear_tuned_lens"}
    state = torch.load(tmp_path / PARAMS_FILE, weights_only=True)
    assert list(state) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    assert torch.equal(state["1.weight"], weight[1]) and torch.equal(state["2.bias"], bias[2])
    w2, b2, config2 = load_lens(tmp_path, 3, 32)
    assert torch.equal(w2, weight) and torch.equal(b2, bias) and config2 == config


def test_unembed_hash_is_the_librarys_formula():
    import hashlib

    w = torch.arange(2000, dtype=torch.float32).reshape(40, 50) / 7
    expected = hashlib.sha256(str.encode(np.array_str(w.numpy(), precision=1))).hexdigest()
    assert unembed_hash(w) == expected
    assert unembed_hash(w.bfloat16()) == unembed_hash(w.bfloat16().float())


def test_a_lens_without_biases_loads_with_zero_biases(tmp_path):
    loaded = tiny_lm("llama")
    weight, _ = random_translators(loaded)
    torch.save({f"{i}.weight": weight[i] for i in range(3)}, tmp_path / PARAMS_FILE)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"d_model": 32, "num_hidden_layers": 3,
                                                    "bias": False}))
    w2, b2, _ = load_lens(tmp_path, 3, 32)
    assert torch.equal(w2, weight) and not b2.any()


@pytest.mark.parametrize("case, message", [
    ("layers", r"holds 2 translators of width 32; this model needs 3 of width 32"),
    ("width", r"holds 3 translators of width 16; this model needs 3 of width 32"),
    ("type", r"lens_type 'other'; accepted: 'linear_tuned_lens'"),
    ("keys", r"params.pt keys \['0.bias', '0.weight', '1.bias', '1.weight'\]…; accepted"),
    ("shape", r"0.weight has shape \(32, 16\); accepted: \(32, 32\)"),
    ("garbage", r"cannot read params.pt \(.*\); accepted: the tuned-lens library's state dict"),
    ("config", r"cannot read config.json"),
])
def test_a_bad_lens_folder_is_one_line_naming_it(tmp_path, case, message):
    config = {"d_model": 32, "num_hidden_layers": 3, "bias": True}
    state = {f"{i}.{p}": torch.zeros((32, 32) if p == "weight" else (32,))
             for i in range(3) for p in ("weight", "bias")}
    if case == "layers":
        config["num_hidden_layers"] = 2
    elif case == "width":
        config["d_model"] = 16
    elif case == "type":
        config["lens_type"] = "other"
    elif case == "keys":
        state = {k: v for k, v in state.items() if k[0] in "01"}
    elif case == "shape":
        state["0.weight"] = torch.zeros(32, 16)
    torch.save(state, tmp_path / PARAMS_FILE)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config) if case != "config" else "{not json")
    if case == "garbage":
        (tmp_path / PARAMS_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=message) as err:
        load_lens(tmp_path, 3, 32)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


# ---------------------------------------------------------------- the tuned-lens library itself

LIBRARY_ARCHITECTURES = ("llama", "gpt2", "gpt_neox", "opt")  # those its model_surgery knows


def _library():
    return pytest.importorskip("tuned_lens.nn.lenses", reason="the tuned-lens package (test "
                               "extra `tunedlens`) is not installed")


@pytest.mark.parametrize("model_type", LIBRARY_ARCHITECTURES)
def test_the_library_reads_our_lens_as_we_do(tmp_path, model_type):
    lenses = _library()
    from tuned_lens.nn.unembed import Unembed

    loaded = tiny_lm(model_type)
    weight, bias = random_translators(loaded)
    save_lens(tmp_path, weight, bias, base_model="tiny", unembedding=loaded.adapter.unembed_weight)
    unembed = Unembed(loaded.model)
    assert unembed.unembedding_hash() == unembed_hash(loaded.adapter.unembed_weight)
    theirs = lenses.TunedLens.from_unembed_and_pretrained(unembed, str(tmp_path))
    ours = TranslatedLens(loaded.adapter, *load_lens(tmp_path, 3, 32)[:2], "ours")
    with torch.no_grad():
        hidden = loaded.model(IDS, output_hidden_states=True).hidden_states
    stacked = torch.stack([h[:, -1] for h in hidden[:-1]], dim=1)  # layers 0 .. L-1, pre-norm
    read = ours.read_layers(stacked, range(3), ALL_TOKENS)
    for layer in range(3):
        with torch.no_grad():
            expected = theirs(hidden[layer][:, -1], idx=layer)
        torch.testing.assert_close(read[:, layer], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", LIBRARY_ARCHITECTURES)
def test_a_lens_saved_by_the_library_loads_and_reads_alike(tmp_path, model_type):
    lenses = _library()
    loaded = tiny_lm(model_type)
    theirs = lenses.TunedLens.from_model(loaded.model)
    weight, bias = random_translators(loaded, seed=7)
    with torch.no_grad():
        for i, translator in enumerate(theirs):
            translator.weight.copy_(weight[i])
            translator.bias.copy_(bias[i])
    theirs.save(tmp_path)
    w2, b2, config = load_lens(tmp_path, 3, 32)
    assert torch.equal(w2, weight) and torch.equal(b2, bias)
    assert config["unembed_hash"] == unembed_hash(loaded.adapter.unembed_weight)
    ours = TranslatedLens(loaded.adapter, w2, b2, "theirs")
    stacked, _ = residuals(loaded)
    read = ours.read_layers(stacked, range(4), ALL_TOKENS)
    for layer in range(3):
        with torch.no_grad():
            torch.testing.assert_close(read[:, layer], theirs(stacked[:, layer], idx=layer),
                                       rtol=1e-5, atol=1e-5)
