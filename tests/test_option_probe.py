"""``lens=probe``: the per-layer probe is scikit-learn's LogisticRegression (after its
StandardScaler) on the same residuals — two options (binary) and four (multinomial) — fit on the
calibration rows only; it reads only the options, so cloze and the option mass are refused in one
line before a job starts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny, spec_of
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from calibrate.core.option_scores import option_probabilities
from calibrate.errors import ConfigError
from calibrate.model.load import wrap_model
from calibrate.readouts import ReadoutSource, build_readout
from calibrate.readouts.option_probe import OptionProbeSettings, fit_logistic
from calibrate.tasks.prompts import PromptSet


def sklearn_probs(x_fit, y_fit, x_read, c):
    model = make_pipeline(StandardScaler(),
                          LogisticRegression(C=c, tol=1e-12, max_iter=100_000))
    model.fit(x_fit, y_fit)
    return model.predict_proba(x_read)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_the_fit_is_scikit_learns_logistic_regression(n_classes):
    rng = np.random.default_rng(0)
    n, hidden = 300, 12
    x = rng.normal(size=(n, hidden)) * rng.uniform(0.1, 50, size=hidden) + 7.0
    w_true = rng.normal(size=(n_classes, hidden)) / (np.abs(x).mean(0) + 1)
    y = np.argmax(x @ w_true.T + rng.gumbel(size=(n, n_classes)), axis=1)
    mean, std = x.mean(0), x.std(0)
    w, b, _ = fit_logistic((x - mean) / std, y, n_classes, 0.3, 10_000, 1e-10)
    z = ((x - mean) / std) @ w.T + b
    if n_classes == 2:
        z = np.concatenate([np.zeros_like(z), z], axis=1)
    ours = np.exp(z - np.logaddexp.reduce(z, axis=1, keepdims=True))
    np.testing.assert_allclose(ours, sklearn_probs(x, y, x, 0.3), atol=2e-6)


def test_missing_options_are_left_out_of_the_softmax():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 5))
    y = rng.integers(0, 3, size=80)
    mask = np.ones((80, 3), bool)
    mask[:20, 2] = False
    y[:20] = y[:20] % 2
    w, b, _ = fit_logistic(x, y, 3, 1.0, 1000, 1e-8, mask)
    assert w.shape == (3, 5) and np.isfinite(w).all()


@pytest.fixture(scope="module")
def tiny_lm(word_tokenizer):
    return wrap_model(build_tiny("llama", len(word_tokenizer), seed=2), word_tokenizer, name="tiny")


def prompt_set(tokenizer, n_options: int, n: int = 60) -> PromptSet:
    words = "the movie was great a very boring film this is not good it bad fun".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 9)))) + " answer :"
             for _ in range(n)]
    letters = "A B C D".split()[:n_options]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in letters]
    labels = rng.integers(0, n_options, size=n)
    return PromptSet(texts, labels, np.tile(ids, (n, 1)), [" " + t for t in letters], False)


def hidden_last(loaded, texts) -> np.ndarray:
    """The last position's residual of every layer [n, L+1, H], one text at a time, from the
    model's own hidden states (the last layer: the final norm's input)."""
    final = []
    handle = loaded.adapter.final_norm.register_forward_pre_hook(
        lambda _m, args: final.append(args[0][:, -1].detach()))
    rows = []
    try:
        for ids in loaded.tokenizer(list(texts))["input_ids"]:
            with torch.no_grad():
                out = loaded.model(torch.tensor([ids]), output_hidden_states=True)
            rows.append(torch.stack([h[0, -1] for h in out.hidden_states[:-1]] + [final[-1][0]]))
    finally:
        handle.remove()
    return torch.stack(rows).double().numpy()


@pytest.mark.parametrize("n_options", [2, 4])
def test_every_layer_reads_as_scikit_learn_fit_on_the_calibration_rows(tiny_lm, n_options,
                                                                       tmp_path):
    prompts = prompt_set(tiny_lm.tokenizer, n_options)
    cal, evaluation = np.arange(40), np.arange(40, 60)
    lens = build_readout(OptionProbeSettings(c=0.5, tol=1e-10, max_iter=10_000),
                         ReadoutSource(tiny_lm, prompts.subset(cal), tmp_path))
    residual = hidden_last(tiny_lm, prompts.prompts)
    n_layers = residual.shape[1]
    read = lens.read_layers(torch.as_tensor(residual[evaluation]), range(n_layers),
                            torch.as_tensor(prompts.option_ids[evaluation]))
    probs = option_probabilities(read.numpy())
    for layer in range(n_layers):
        expected = sklearn_probs(residual[cal, layer], prompts.labels[cal],
                                 residual[evaluation, layer], 0.5)
        np.testing.assert_allclose(probs[:, layer], expected, atol=5e-5)
    summary = lens.summary()
    assert summary["fit_on"]["rows"] == 40 and summary["kl_to_final"] is None
    assert summary["slot_tokens"] == prompts.option_ids[0].tolist()
    assert lens.identity.startswith("probe:") and not lens.full_vocabulary
    with pytest.raises(NotImplementedError):
        lens.vocab_logsumexp(lens.prepare(torch.as_tensor(residual[:2]), range(n_layers)))


def test_other_option_tokens_are_refused(tiny_lm, tmp_path):
    prompts = prompt_set(tiny_lm.tokenizer, 2)
    lens = build_readout(OptionProbeSettings(), ReadoutSource(tiny_lm, prompts, tmp_path))
    state = lens.prepare(torch.zeros(3, 4, 32), range(4))
    ids = torch.as_tensor(prompts.option_ids[:3]).flip(-1)
    with pytest.raises(ConfigError, match=r"lens=probe was fit on the option tokens \[\d+, \d+\] "
                                          "and is asked to read others"):
        lens.option_logits(state, ids)


def test_without_a_calibration_split_it_is_refused(tiny_lm):
    with pytest.raises(ConfigError, match="lens=probe is fit on the job's calibration split"):
        build_readout(OptionProbeSettings(), ReadoutSource(tiny_lm, None))


@pytest.mark.parametrize("overrides, message", [
    (["dataset=arc_easy", "probe.option_mass=none"],
     "lens=probe reads only the answer options; dataset.answer_format='cloze' scores every "
     "continuation token over the whole vocabulary; accepted with this lens: "
     "dataset.answer_format=letters or verbalizer"),
    ([], "probe.option_mass='final' is the full-vocabulary mass on the options, and lens=probe "
         "reads only the options; accepted with this lens: probe.option_mass=none"),
    (["probe.option_mass=all"], "probe.option_mass='all' is the full-vocabulary mass"),
])
def test_cloze_and_the_option_mass_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        spec_of("lens=probe", *overrides)
    assert str(err.value) == message or str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_letters_and_the_verbalizer_are_accepted():
    assert spec_of("lens=probe", "probe.option_mass=none").lens.c == 1.0
    assert spec_of("lens=probe", "probe.option_mass=none", "dataset=arc_easy",
                   "dataset.answer_format=letters").fits_readout


@pytest.mark.parametrize("key, value, message", [
    ("c", 0.0, "lens.c=0.0; accepted: a number > 0"),
    ("standardize", "yes", "lens.standardize='yes'; accepted: true, false"),
    ("max_iter", 0, "lens.max_iter=0; accepted: an integer >= 1"),
])
def test_bad_settings_are_one_line(key, value, message):
    with pytest.raises(ConfigError, match=message):
        OptionProbeSettings(**{key: value})
