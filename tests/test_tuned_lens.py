"""``lens=tuned``: training lowers the KL to the final layer at every layer below it (tiny random
models of every architecture), its gradient is the KL's, fits are cached by identity, saved lenses
load by ``lens.path``, and bad settings are one line."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import ARCHITECTURES, build_tiny

from calibrate.engine.lens import LogitLens
from calibrate.errors import ConfigError
from calibrate.model.adapters import get_adapter
from calibrate.model.load import wrap_model
from calibrate.readouts import ReadoutSource, build_readout, tuned_lens
from calibrate.readouts.translators import TranslatedLens, load_lens, save_lens
from calibrate.readouts.tuned_lens import TunedLensSettings, _unembed_grad, train_translators
from calibrate.tasks.prompts import PromptSet

WORDS = "the movie was great a very boring film this is not good it bad fun . ? yes no".split()


def sharp_lm(model_type: str, tokenizer, seed: int = 0):
    """A tiny model whose final norm is scaled up: peaked next-token distributions, so the
    logit lens's KL to the last layer is far from 0 (the random init's is ~0.001 nats)."""
    model = build_tiny(model_type, len(tokenizer), seed)
    with torch.no_grad():
        get_adapter(model).final_norm.weight.mul_(20.0)
    return wrap_model(model, tokenizer, name=f"sharp-{model_type}")


def prompts(n: int = 60, seed: int = 0) -> PromptSet:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 20)))) for _ in range(n)]
    return PromptSet(texts, np.zeros(n, np.int64), np.zeros((n, 2), np.int64), [" a", " b"], False)


def source(loaded, prompt_set, cache, seed: int = 0) -> ReadoutSource:
    return ReadoutSource(loaded, prompt_set, cache, seed, {"split": "calibration"})


FAST = dict(steps=60, tokens_per_step=64, lr=0.01, kl_tokens=256, holdout_fraction=0.25)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_training_lowers_the_held_out_kl_at_every_layer_below_the_last(model_type, word_tokenizer,
                                                                       tmp_path):
    loaded = sharp_lm(model_type, word_tokenizer)
    lens = build_readout(TunedLensSettings(**FAST), source(loaded, prompts(), tmp_path))
    kl = lens.summary()["kl_to_final"]
    assert kl["layer"] == [0, 1, 2] and kl["tokens"] > 100
    assert all(t < g for t, g in zip(kl["tuned"], kl["logit"])), kl
    assert lens.summary()["train_kl_last_step"] < lens.summary()["train_kl_first_step"]


def test_the_sgd_optimizer_also_lowers_it(word_tokenizer, tmp_path):
    loaded = sharp_lm("llama", word_tokenizer)
    lens = build_readout(TunedLensSettings(**{**FAST, "optimizer": "sgd", "lr": 1.0}),
                         source(loaded, prompts(), tmp_path))
    kl = lens.summary()["kl_to_final"]
    assert all(t < g for t, g in zip(kl["tuned"], kl["logit"])), kl


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "phi"])  # plain, soft-capped, bias
def test_the_gradient_is_the_kls(model_type, word_tokenizer):
    loaded = sharp_lm(model_type, word_tokenizer)
    lens = LogitLens(loaded.adapter)
    gen = torch.Generator().manual_seed(0)
    normed = torch.randn(5, 32, generator=gen) * 2
    target = torch.log_softmax(torch.randn(5, len(word_tokenizer), generator=gen) * 3, -1)
    p = target.exp()
    kl_part, grad = _unembed_grad(lens, normed, p, lens.weight.float())
    # the reference: autograd of KL(p || softmax(lens logits)) in float64, mean over rows
    x = normed.double().requires_grad_(True)
    logits = x @ lens.weight.double().T
    if lens.bias is not None:
        logits = logits + lens.bias.double()
    if lens.softcap is not None:
        logits = torch.tanh(logits / lens.softcap) * lens.softcap
    kl = (p.double() * (target.double() - torch.log_softmax(logits, -1))).sum(-1)
    kl.mean().backward()
    torch.testing.assert_close(kl_part + (p * target).sum(-1), kl.detach().float(), rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(grad, x.grad.float(), rtol=1e-4, atol=1e-6)


def test_one_step_moves_every_translator_against_its_layers_kl_gradient(word_tokenizer):
    """Adam's first step is -lr x sign(gradient): every layer's translator and bias move against
    the float64 autograd gradient of that layer's KL (one token: the step's sample is it)."""
    loaded = sharp_lm("llama", word_tokenizer)
    lens = LogitLens(loaded.adapter)
    residual = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(1)) * 3
    settings = TunedLensSettings(steps=1, tokens_per_step=8, lr=1e-3, weight_decay=0.0,
                                 clip=1e9, train_dtype="float32")
    w, b, _ = train_translators(lens, residual, settings, seed=0)
    norm = copy.deepcopy(lens.norm).double()
    unembed = lens.weight.detach().double()
    h = residual[0].double()  # [L+1, H]
    logp = torch.log_softmax(norm(h[-1]) @ unembed.T, -1)
    gw = torch.zeros(3, 32, 32, dtype=torch.float64, requires_grad=True)
    gb = torch.zeros(3, 32, dtype=torch.float64, requires_grad=True)
    total = 0
    for layer in range(3):
        logq = torch.log_softmax(norm(h[layer] + gw[layer] @ h[layer] + gb[layer]) @ unembed.T, -1)
        total = total + (logp.exp() * (logp - logq)).sum()
    total.backward()
    for got, grad in ((w, gw.grad), (b, gb.grad)):
        big = grad.abs() > 1e-3 * grad.abs().max()
        assert big.sum() > 20
        assert torch.equal(torch.sign(got[big]).double(), -torch.sign(grad[big]))
    big = gw.grad.abs() > 1e-3 * gw.grad.abs().max()  # the weight's step is lr in size
    torch.testing.assert_close(w[big].abs(), torch.full_like(w[big], 1e-3), rtol=1e-3, atol=0)


def test_training_is_seeded_and_starts_from_the_identity(word_tokenizer):
    loaded = sharp_lm("llama", word_tokenizer)
    lens = LogitLens(loaded.adapter)
    residual = torch.randn(50, 4, 32) * 3
    settings = TunedLensSettings(**{**FAST, "steps": 3})
    w1, b1, curve1 = train_translators(lens, residual, settings, seed=5)
    w2, b2, curve2 = train_translators(lens, residual, settings, seed=5)
    assert torch.equal(w1, w2) and torch.equal(b1, b2) and curve1 == curve2
    w0, b0, _ = train_translators(lens, residual, TunedLensSettings(**{**FAST, "steps": 1,
                                                                        "lr": 1e-30}), seed=5)
    assert w0.abs().max() < 1e-20 and b0.abs().max() < 1e-20  # zero (identity) initialised


def test_a_fit_is_cached_by_identity_and_reused(word_tokenizer, tmp_path, monkeypatch):
    loaded = sharp_lm("llama", word_tokenizer)
    settings = TunedLensSettings(**{**FAST, "steps": 5})
    first = build_readout(settings, source(loaded, prompts(), tmp_path))
    cache = first.summary()["cache"]
    assert cache.startswith(str(tmp_path / "lenses" / "tuned"))

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(tuned_lens, "train_translators", no_training)
    again = build_readout(settings, source(loaded, prompts(), tmp_path))
    assert again.identity == first.identity and again.summary()["cache"] == cache
    assert all(torch.equal(a, b) for a, b in zip(again.translators, first.translators))
    assert again.summary()["kl_to_final"] == first.summary()["kl_to_final"]
    monkeypatch.undo()
    # the identity changes with the text, the settings, the seed and the weights
    others = [build_readout(settings, source(loaded, prompts(seed=1), tmp_path)),
              build_readout(TunedLensSettings(**{**FAST, "steps": 6}),
                            source(loaded, prompts(), tmp_path)),
              build_readout(settings, source(loaded, prompts(), tmp_path, seed=3)),
              build_readout(settings, source(sharp_lm("llama", word_tokenizer, seed=1), prompts(),
                                             tmp_path))]
    assert len({first.identity, *(o.identity for o in others)}) == 5
    assert first.identity.startswith("tuned:")


def test_what_the_fit_records(word_tokenizer, tmp_path):
    loaded = sharp_lm("llama", word_tokenizer)
    prompt_set = prompts()
    lens = build_readout(TunedLensSettings(**{**FAST, "steps": 2}),
                         ReadoutSource(loaded, prompt_set, tmp_path, 0,
                                       {"split": "calibration", "rows": 60}))
    summary = lens.summary()
    fit_on = summary["fit_on"]
    n_tokens = sum(len(s) for s in word_tokenizer(prompt_set.prompts)["input_ids"])
    assert fit_on["text"] == "calibration split prompts" and fit_on["split"] == "calibration"
    assert fit_on["tokens"] == n_tokens and fit_on["n_sequences"] == 60
    assert summary["held_out_sequences"] == 15  # 25 % of 60
    assert 0 < fit_on["fit_tokens"] < n_tokens  # the held-out sequences are not fit on
    assert summary["model_fingerprint"] == loaded.identity()["fingerprint"]
    assert summary["settings"]["seed"] == 0 and summary["settings"]["steps"] == 2


def test_max_tokens_samples_the_positions(word_tokenizer, tmp_path):
    loaded = sharp_lm("llama", word_tokenizer)
    lens = build_readout(TunedLensSettings(**{**FAST, "steps": 2, "max_tokens": 50}),
                         source(loaded, prompts(), tmp_path))
    assert lens.summary()["fit_on"]["fit_tokens"] == 50


def test_a_text_file_instead_of_the_calibration_prompts(word_tokenizer, tmp_path):
    loaded = sharp_lm("llama", word_tokenizer)
    text = tmp_path / "text.txt"
    text.write_text("the movie was great .\nvery good fun\n\nthis film is bad . not good\n\n"
                    + "\n\n".join(" ".join(["it", "was", "fun"] * k) for k in range(1, 12)))
    settings = TunedLensSettings(**{**FAST, "steps": 2, "text_path": str(text), "max_length": 8})
    assert not tuned_lens.Tuned().fits_on_prompts(settings)
    lens = build_readout(settings, ReadoutSource(loaded, None, tmp_path))
    fit_on = lens.summary()["fit_on"]
    assert fit_on["text"] == "file" and fit_on["path"] == str(text.resolve())
    assert fit_on["n_documents"] == 13 and fit_on["n_sequences"] > 13  # windows of 8 tokens


def test_without_a_split_or_a_text_the_lens_is_refused_in_one_line(word_tokenizer):
    loaded = sharp_lm("llama", word_tokenizer)
    with pytest.raises(ConfigError, match="lens=tuned trains on the job's calibration split, "
                                          "and this job has none; accepted: a study with a split"):
        build_readout(TunedLensSettings(), ReadoutSource(loaded, None))


def test_lens_path_loads_a_saved_lens(word_tokenizer, tmp_path):
    loaded = sharp_lm("llama", word_tokenizer)
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(3, 32, 32, generator=gen) * 0.1, torch.randn(3, 32, generator=gen)
    save_lens(tmp_path / "lens", weight, bias, base_model="x",
              unembedding=loaded.adapter.unembed_weight)
    settings = TunedLensSettings(path=str(tmp_path / "lens"))
    assert not tuned_lens.Tuned().fits_on_prompts(settings)
    lens = build_readout(settings, ReadoutSource(loaded, None))
    assert isinstance(lens, TranslatedLens) and lens.identity.startswith("tuned:file:")
    assert torch.equal(lens.translators[0], weight) and torch.equal(lens.translators[1], bias)
    assert lens.summary()["unembed_hash_matches"] is True
    other = sharp_lm("llama", word_tokenizer, seed=4)  # another unembedding: said, not refused
    assert build_readout(settings, ReadoutSource(other, None)).summary()[
        "unembed_hash_matches"] is False
    # what a fit saves is such a folder
    fitted = build_readout(TunedLensSettings(**{**FAST, "steps": 2}),
                           source(loaded, prompts(), tmp_path / "cache"))
    w, b, _ = load_lens(fitted.summary()["cache"], 3, 32)
    assert torch.equal(w, fitted.translators[0]) and torch.equal(b, fitted.translators[1])


def test_a_published_lens_cannot_be_fetched_offline_one_line(word_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = sharp_lm("llama", word_tokenizer)
    with pytest.raises(ConfigError, match=r"lens.path=hub:EleutherAI/pythia-70m: the published "
                                          r"lens cannot be fetched .*accepted offline") as err:
        build_readout(TunedLensSettings(path="hub:EleutherAI/pythia-70m"),
                      ReadoutSource(loaded, None))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key, value, message", [
    ("steps", 0, "lens.steps=0; accepted: an integer >= 1"),
    ("optimizer", "lbfgs", "lens.optimizer='lbfgs'; accepted: adam, sgd"),
    ("lr", -1.0, "lens.lr=-1.0; accepted: a number > 0"),
    ("momentum", 1.0, r"lens.momentum=1.0; accepted: a number in \[0, 1\)"),
    ("train_dtype", "float16", "lens.train_dtype='float16'; accepted: bfloat16, float32"),
    ("holdout_fraction", 1.0, r"lens.holdout_fraction=1.0; accepted: a number in \[0, 1\)"),
    ("path", "/nonexistent/lens", "lens.path='/nonexistent/lens' is not a folder with "
                                  "config.json and params.pt"),
    ("path", "hub:", "lens.path='hub:' names no model"),
    ("text_path", "/nonexistent.txt", "lens.text_path='/nonexistent.txt' is not a file"),
    ("seed", -1, "lens.seed=-1; accepted: null or an integer >= 0"),
])
def test_bad_settings_are_one_line(key, value, message):
    with pytest.raises(ConfigError, match=message):
        TunedLensSettings(**{key: value})
