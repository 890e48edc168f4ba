"""The representation-engineering directions (``pca``, ``probe``), the gradient-fitted vector
and repeng GGUF control vectors, each against an independent reference:

* pca against sklearn's PCA of the same difference vectors (and numpy's SVD);
* probe's logistic regression against sklearn's ``LogisticRegression`` (same objective, C);
* the gradient's readouts against the harness's steering engine (the last-layer lens read of an
  edited residual; a full forward pass with the edit hooked in for an earlier layer; the cloze
  engine's steered log-likelihoods), its gradient against central finite differences in
  float64, the soft-binned ECE against the binned ECE at a vanishing temperature;
* GGUF control vectors written with the ``gguf`` package in repeng's layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny

from calibrate.core.direction import DirectionError
from calibrate.core.direction_methods import (
    logistic_regression,
    normalised_differences,
    pca_direction,
    probe_direction,
)
from calibrate.core.gradient_fit import (
    GradientSettings,
    fit_vector,
    objective_value,
    soft_ece,
    total_loss,
)

sklearn = pytest.importorskip("sklearn")


def _residuals(seed=0, n=40, h=16, layers=(2, 3, 4)):
    rng = np.random.default_rng(seed)
    drift = rng.standard_normal(h)
    res = {layers[0] - 1: rng.standard_normal((n, h))}
    for layer in layers:
        res[layer] = res[layer - 1] + 0.3 * drift + rng.standard_normal((n, h)) * (1 + layer / 4)
    return res, list(layers)


# ---------------------------------------------------------------- pca


def test_pca_equals_sklearn_pca_of_the_differences():
    from sklearn.decomposition import PCA

    res, layers = _residuals()
    d = pca_direction(res, layers)
    diffs = []
    for layer in layers:  # the differences, recomputed here
        x = res[layer] - res[layer - 1]
        diffs.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    diffs = np.concatenate(diffs)
    ref = PCA(n_components=1, svd_solver="full").fit(diffs).components_[0]
    ref = ref * np.sign(diffs.mean(0) @ ref)  # the documented orientation
    np.testing.assert_allclose(d.vector, ref, atol=1e-10)
    np.testing.assert_allclose(normalised_differences(res, layers), diffs, atol=1e-12)
    assert d.meta["explained_variance_ratio"] == pytest.approx(
        PCA(n_components=1).fit(diffs).explained_variance_ratio_[0], rel=1e-9)
    assert diffs.mean(0) @ d.vector >= 0


def test_pca_is_the_top_right_singular_vector():
    res, layers = _residuals(seed=3)
    diffs = normalised_differences(res, layers)
    _, _, vt = np.linalg.svd(diffs - diffs.mean(0))
    assert abs(pca_direction(res, layers).vector @ vt[0]) == pytest.approx(1.0, abs=1e-10)


# ---------------------------------------------------------------- probe


def _classification(seed=0, n=120, h=10):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h)) * 3 + 5
    w = rng.standard_normal(h)
    y = (x @ w + rng.standard_normal(n) * 2 > np.median(x @ w))
    return x, y


@pytest.mark.parametrize("c", [0.01, 1.0, 100.0])
def test_logistic_regression_equals_sklearn(c):
    from sklearn.linear_model import LogisticRegression

    x, y = _classification()
    w, b = logistic_regression(x, y, c)
    ref = LogisticRegression(C=c, tol=1e-12, max_iter=100_000).fit(x, y)
    np.testing.assert_allclose(w, ref.coef_[0], rtol=1e-5, atol=1e-6)
    assert b == pytest.approx(ref.intercept_[0], rel=1e-5, abs=1e-6)


def test_probe_direction_points_from_correct_to_incorrect():
    from sklearn.linear_model import LogisticRegression

    x, y = _classification(seed=1)
    d = probe_direction(x, y, layer=7, c=1.0)
    ref = LogisticRegression(C=1.0, tol=1e-12, max_iter=100_000).fit(x, y).coef_[0]
    np.testing.assert_allclose(d.vector, -ref / np.linalg.norm(ref), atol=1e-6)
    assert (x[~y] @ d.vector).mean() > (x[y] @ d.vector).mean()
    assert d.meta["layers"] == [7] and d.meta["n_correct"] == int(y.sum())


def test_probe_needs_both_classes():
    x, _ = _classification()
    with pytest.raises(DirectionError, match="both correct and incorrect"):
        probe_direction(x, np.ones(len(x), bool), 3)


# ---------------------------------------------------------------- gradient: objectives


def test_soft_ece_tends_to_the_binned_ece():
    from calibrate.core.metrics import layer_table

    rng = np.random.default_rng(0)
    n_bins = 10
    # confidences away from bin edges, so a tiny temperature assigns each to its own bin
    conf = (rng.integers(5, 10, 300) + rng.uniform(0.2, 0.8, 300)) / n_bins
    correct = rng.uniform(size=300) < conf ** 2
    probs = np.stack([conf, 1 - conf], axis=1)
    labels = np.where(correct, 0, 1)
    ref = layer_table(probs[:, None, :], labels, n_bins=n_bins)["ece"].iloc[0]
    got = soft_ece(torch.tensor(conf, dtype=torch.float64), torch.tensor(correct, dtype=torch.float64),
                   n_bins, 1e-5)
    assert float(got) == pytest.approx(ref, abs=1e-9)


def test_objectives_against_numpy():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((50, 4)) * 3
    z[:5, 3] = -np.inf  # examples with 3 options
    y = rng.integers(0, 3, 50)
    p = np.exp(np.where(np.isinf(z), -np.inf, z - z.max(1, keepdims=True)))
    p /= p.sum(1, keepdims=True)
    zt, yt = torch.tensor(z), torch.tensor(y)
    nll = objective_value(zt, yt, GradientSettings(objective="nll"))
    brier = objective_value(zt, yt, GradientSettings(objective="brier"))
    assert float(nll) == pytest.approx(-np.log(p[np.arange(50), y]).mean(), rel=1e-12)
    assert float(brier) == pytest.approx(((p - np.eye(4)[y]) ** 2).sum(1).mean(), rel=1e-12)


def test_settings_are_checked():
    from conftest import typed

    from calibrate.errors import ConfigError

    with pytest.raises(DirectionError, match="objective"):
        GradientSettings(objective="ece")
    # unknown keys: refused by the typed config tree (also when added with +)
    with pytest.raises(ConfigError, match="direction.gradient.steps is not a config key.*lr"):
        typed("direction.method=gradient", "+direction.gradient.steps=3")
    with pytest.raises(DirectionError, match="lr"):
        GradientSettings(lr=0)
    with pytest.raises(DirectionError, match="direction.gradient.lr"):
        typed("direction.method=gradient", "direction.gradient.lr=0")


# ---------------------------------------------------------------- gradient: readouts on tiny models


def _tiny64(arch, word_tokenizer):
    from calibrate.model.load import wrap_model

    model = build_tiny(arch, len(word_tokenizer)).double()
    return wrap_model(model, word_tokenizer, name=f"tiny64-{arch}")


PROMPTS = ["the movie was great . it is", "a film , very boring : it is", "this is not good",
           "the answer is yes or no ?", "fun fun fun film", "bad bad movie was terrible ."]


def _prompt_set(tok):
    from calibrate.tasks.prompts import PromptSet

    ids = [tok.convert_tokens_to_ids(w) for w in ("positive", "negative", "good")]
    option_ids = np.array([ids] * len(PROMPTS))
    option_ids[1, 2] = -1  # one example with two options
    labels = np.array([0, 1, 0, 1, 0, 1])
    return PromptSet(PROMPTS, labels, option_ids, [" positive", " negative", " good"], False)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "phi"])  # plain, soft-capped, biased
def test_last_layer_readout_equals_the_lens_read(arch, word_tokenizer):
    from calibrate.directions.gradient import LastLayerReadout, OptionHead
    from calibrate.engine.last_layer import last_layer_logits
    from calibrate.engine.probe import ProbeSettings, run_probe

    loaded = _tiny64(arch, word_tokenizer)
    ps = _prompt_set(word_tokenizer)
    last = loaded.adapter.num_blocks
    probe = run_probe(loaded, ps, ProbeSettings(progress=False).keeping((last,)))
    readout = LastLayerReadout(OptionHead(loaded, torch.float64), probe.residuals[last],
                               ps.option_ids)
    v = np.random.default_rng(0).standard_normal(32)
    rows = torch.arange(len(PROMPTS))
    got = readout(torch.tensor(v), rows).numpy()
    ref = last_layer_logits(loaded, probe.residuals[last], ps.option_ids, v[None] / np.linalg.norm(v),
                            np.array([np.linalg.norm(v)]))[0, 0]
    np.testing.assert_allclose(got, ref, atol=1e-4)  # the lens reads in float32
    np.testing.assert_allclose(readout(torch.zeros(32, dtype=torch.float64), rows).numpy(),
                               probe.option_logits[:, -1], atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_upper_readout_equals_a_hooked_forward_pass(arch, word_tokenizer):
    from calibrate.directions.gradient import OptionHead, UpperReadout
    from calibrate.engine.edits import Steering
    from calibrate.engine.steer import run_steered

    loaded = _tiny64(arch, word_tokenizer)
    ps = _prompt_set(word_tokenizer)
    readout = UpperReadout(loaded, OptionHead(loaded, torch.float64), ps.prompts, ps.option_ids,
                           start=1, batch_size=4)  # two batches
    v = np.random.default_rng(1).standard_normal(32)
    eta = float(np.linalg.norm(v))
    steered = run_steered(loaded, ps, Steering(v / eta, (1,), (0.0, eta), "last"), use_cache=False)
    rows = torch.tensor([5, 0, 3, 1])
    got = readout(torch.tensor(v), rows).numpy()
    np.testing.assert_allclose(got, steered[1, rows.numpy(), -1], atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "phi"])
def test_upper_readout_with_a_shared_prefix_equals_whole_prompts(arch, word_tokenizer):
    """Prompts behind two groups' exemplars: the readout on the prefix caches gives the same
    scores and the same gradient in v as on whole prompts."""
    from dataclasses import replace

    from calibrate.directions.gradient import OptionHead, UpperReadout

    loaded = _tiny64(arch, word_tokenizer)
    base = _prompt_set(word_tokenizer)
    shots = {"a": "the movie was fun . it is positive . ", "b": "not good , bad film : negative . "}
    groups = tuple("ab"[i % 2] for i in range(len(PROMPTS)))
    ps = replace(base, prompts=[shots[g] + p for g, p in zip(groups, PROMPTS)], groups=groups)
    head = OptionHead(loaded, torch.float64)
    shared = UpperReadout(loaded, head, ps.prompts, ps.option_ids, start=1, batch_size=2,
                          groups=ps.groups)
    whole = UpperReadout(loaded, head, ps.prompts, ps.option_ids, start=1, batch_size=2)
    assert len(whole.batches) == 3  # 6 prompts, 2 per batch
    # per group (3 prompts): batches of 2 and 1, each after its own group's prefix
    assert len(shared.batches) == 4
    assert all(len({groups[i] for i in idx}) == 1 for _, idx in shared.batches)
    rows = torch.tensor([5, 0, 3, 1, 2, 4])
    v0 = np.random.default_rng(2).standard_normal(32)
    grads = []
    for readout in (shared, whole):
        v = torch.tensor(v0, requires_grad=True)
        with torch.enable_grad():
            out = readout(v, rows)
            weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
            (grad,) = torch.autograd.grad((torch.where(torch.isfinite(out), out, 0) * weight).sum(), v)
        grads.append((out.detach().numpy(), grad.numpy()))
    np.testing.assert_allclose(grads[0][0], grads[1][0], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(grads[0][1], grads[1][1], atol=1e-4, rtol=1e-4)
    assert np.abs(grads[0][1]).sum() > 0


def _finite_difference_check(readout, labels, settings, hidden, seed=0, eps=1e-6, rel=1e-5):
    """Autograd's directional derivative of the penalised loss against central differences.

    RMSNorm in Llama/Gemma computes in float32 even for a float64 model, so those need a larger
    step and tolerance; LayerNorm models (phi, gpt2) run fully in float64."""
    rng = np.random.default_rng(seed)
    v0 = torch.tensor(rng.standard_normal(hidden) * 0.5, requires_grad=True)
    y = torch.as_tensor(labels)
    rows = torch.arange(len(labels))
    with torch.no_grad():
        base_pred = readout(torch.zeros(hidden, dtype=torch.float64), rows).argmax(-1)
    loss, _ = total_loss(readout, v0, rows, y, base_pred, settings, scale=2.0)
    (grad,) = torch.autograd.grad(loss, v0)
    for _ in range(4):
        d = torch.tensor(rng.standard_normal(hidden))
        with torch.no_grad():
            plus, _ = total_loss(readout, v0 + eps * d, rows, y, base_pred, settings, 2.0)
            minus, _ = total_loss(readout, v0 - eps * d, rows, y, base_pred, settings, 2.0)
        fd = float(plus - minus) / (2 * eps)
        assert float(grad @ d) == pytest.approx(fd, rel=rel, abs=1e-8)


@pytest.mark.parametrize("arch", ["phi", "gemma3_text"])  # biased head; soft-capped (float32 norm)
@pytest.mark.parametrize("objective", ["nll", "brier", "soft_ece"])
def test_gradient_matches_finite_differences_last_layer(objective, arch, word_tokenizer):
    from calibrate.directions.gradient import LastLayerReadout, OptionHead
    from calibrate.engine.probe import ProbeSettings, run_probe

    loaded = _tiny64(arch, word_tokenizer)
    ps = _prompt_set(word_tokenizer)
    last = loaded.adapter.num_blocks
    probe = run_probe(loaded, ps, ProbeSettings(progress=False).keeping((last,)))
    readout = LastLayerReadout(OptionHead(loaded, torch.float64), probe.residuals[last],
                               ps.option_ids)
    settings = GradientSettings(objective=objective, norm_penalty=0.1, accuracy_penalty=0.5,
                                soft_ece_temperature=0.05)
    tol = {"eps": 1e-6, "rel": 1e-6} if arch == "phi" else {"eps": 1e-3, "rel": 1e-3}
    _finite_difference_check(readout, ps.labels, settings, 32, **tol)


def test_gradient_matches_finite_differences_upper_blocks(word_tokenizer):
    from calibrate.directions.gradient import OptionHead, UpperReadout

    loaded = _tiny64("gpt2", word_tokenizer)
    ps = _prompt_set(word_tokenizer)
    readout = UpperReadout(loaded, OptionHead(loaded, torch.float64), ps.prompts, ps.option_ids,
                           start=1)
    _finite_difference_check(readout, ps.labels, GradientSettings(objective="nll"), 32)


def _cloze_set(tok):
    from calibrate.tasks.continuations import build_requests
    from calibrate.tasks.prompts import PromptSet

    contexts = ["Question: is the movie good ?\nAnswer:", "Question: the film was\nAnswer:",
                "Question: is this a sentence ?\nAnswer:", "Question: very bad movie\nAnswer:"]
    options = [["yes", "no very bad"], ["great", "terrible film", "boring"], ["yes it is", "no"],
               ["good", "bad"]]
    requests = build_requests(tok, contexts, options)
    k = max(r.n_options for r in requests)
    first = np.full((len(requests), k), -1)
    for i, r in enumerate(requests):
        first[i, :r.n_options] = [c[0] for c in r.continuations]
    return PromptSet(contexts, np.array([0, 1, 0, 1]), first, [], False, tuple(requests), "char")


def test_cloze_last_layer_readout_equals_the_cloze_engine(word_tokenizer):
    from calibrate.directions.gradient import LastLayerReadout, OptionHead
    from calibrate.engine.cloze import run_cloze, run_cloze_steered
    from calibrate.engine.edits import Steering
    from calibrate.engine.probe import ProbeSettings
    from calibrate.tasks.continuations import cloze_divisors

    loaded = _tiny64("phi", word_tokenizer)
    ps = _cloze_set(word_tokenizer)
    last = loaded.adapter.num_blocks
    settings = ProbeSettings(progress=False)
    base = run_cloze(loaded, list(ps.requests), ps.labels, settings, "char", keep_layers=(last,))
    divisors = cloze_divisors(list(ps.requests), "char")
    readout = LastLayerReadout(OptionHead(loaded, torch.float64), base.residuals[last],
                               ps.option_ids, (base.option_logits[:, -1], divisors))
    v = np.random.default_rng(2).standard_normal(32)
    eta = float(np.linalg.norm(v))
    ref = run_cloze_steered(loaded, list(ps.requests), Steering(v / eta, (last,), (eta,), "last"),
                            settings, "char")[0, :, -1]
    got = readout(torch.tensor(v), torch.arange(4)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
    _finite_difference_check(readout, ps.labels, GradientSettings(objective="nll"), 32)


def test_fit_lowers_the_objective_and_is_deterministic(word_tokenizer):
    from calibrate.directions.gradient import LastLayerReadout, OptionHead
    from calibrate.engine.last_layer import last_layer_logits
    from calibrate.engine.probe import ProbeSettings, run_probe

    loaded = _tiny64("llama", word_tokenizer)
    ps = _prompt_set(word_tokenizer)
    last = loaded.adapter.num_blocks
    probe = run_probe(loaded, ps, ProbeSettings(progress=False).keeping((last,)))
    settings = GradientSettings(objective="nll", holdout_fraction=0.0, max_steps=60, lr=0.05)

    def fit():
        readout = LastLayerReadout(OptionHead(loaded, torch.float64), probe.residuals[last],
                                   ps.option_ids)
        return fit_vector(readout, 32, ps.labels, settings, 1.0, seed=3, dtype=torch.float64)

    first, second = fit(), fit()
    np.testing.assert_array_equal(first.vector, second.vector)
    assert first.curve.equals(second.curve)
    # the objective at v*, recomputed through the lens, against v = 0
    eta = np.linalg.norm(first.vector)
    logits = last_layer_logits(loaded, probe.residuals[last], ps.option_ids,
                               first.direction.vector[None], np.array([0.0, eta]))[0]
    x = logits.astype(np.float64)
    logp = x - np.logaddexp.reduce(np.where(np.isinf(x), -np.inf, x), axis=-1, keepdims=True)
    nll = -logp[:, np.arange(6), ps.labels].mean(axis=1)
    assert nll[1] < nll[0] - 1e-3
    assert first.curve["train_objective"].iloc[-1] < first.curve["train_objective"].iloc[0]


def test_max_norm_bounds_the_vector(word_tokenizer):
    from calibrate.directions.gradient import LastLayerReadout, OptionHead
    from calibrate.engine.probe import ProbeSettings, run_probe

    loaded = _tiny64("llama", word_tokenizer)
    ps = _prompt_set(word_tokenizer)
    last = loaded.adapter.num_blocks
    probe = run_probe(loaded, ps, ProbeSettings(progress=False).keeping((last,)))
    readout = LastLayerReadout(OptionHead(loaded, torch.float64), probe.residuals[last],
                               ps.option_ids)
    fit = fit_vector(readout, 32, ps.labels, GradientSettings(max_norm=0.02, lr=0.5,
                                                              holdout_fraction=0, max_steps=20),
                     3.0, seed=0, dtype=torch.float64)
    assert np.linalg.norm(fit.vector) <= 0.02 * 3.0 * (1 + 1e-9)
    assert (fit.curve["norm"] <= 0.06 + 1e-9).all()


# ---------------------------------------------------------------- repeng GGUF control vectors


def _write_repeng(path, hint, directions):
    """A control vector written the way repeng's ControlVector.export_gguf writes it."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", hint)
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, vec in directions.items():
        writer.add_tensor(f"direction.{layer}", np.asarray(vec, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_read_repeng_gguf(tmp_path):
    from calibrate.directions.gguf import read_control_vector, write_control_vector

    rng = np.random.default_rng(0)
    dirs = {4: rng.standard_normal(16), 9: rng.standard_normal(16)}  # repeng block indices
    _write_repeng(tmp_path / "cv.gguf", "llama", dirs)
    cv = read_control_vector(tmp_path / "cv.gguf")
    assert cv.model_hint == "llama" and list(cv.directions) == [5, 10]  # our numbering
    for layer, vec in dirs.items():
        np.testing.assert_allclose(cv.directions[layer + 1], vec.astype(np.float32), rtol=0, atol=0)
    write_control_vector(tmp_path / "ours.gguf", "llama", cv.directions)  # and back
    again = read_control_vector(tmp_path / "ours.gguf")
    assert {k: v.tolist() for k, v in again.directions.items()} == \
        {k: v.tolist() for k, v in cv.directions.items()}


def test_gguf_direction_picks_the_steering_layer(tmp_path):
    from calibrate.directions.fit import gguf_direction

    rng = np.random.default_rng(1)
    dirs = {4: rng.standard_normal(16), 9: rng.standard_normal(16)}
    _write_repeng(tmp_path / "cv.gguf", "llama", dirs)
    d = gguf_direction(str(tmp_path / "cv.gguf"), [10], "llama", 16, False)
    ref = dirs[9].astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(d.vector, ref / np.linalg.norm(ref), atol=1e-12)
    assert d.meta["layers"] == [10] and d.meta["method"] == "repeng_gguf"
    assert d.meta["loaded_norm"] == pytest.approx(np.linalg.norm(ref))
    with pytest.raises(DirectionError, match="none for the steering layer 7"):
        gguf_direction(str(tmp_path / "cv.gguf"), [7], "llama", 16, False)
    with pytest.raises(DirectionError, match="model type 'llama', not 'gpt2'"):
        gguf_direction(str(tmp_path / "cv.gguf"), [10], "gpt2", 16, False)
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(DirectionError, match="not a readable GGUF"):
        gguf_direction(str(tmp_path / "bad.gguf"), [10], "llama", 16, False)
    with pytest.raises(DirectionError, match="width 16 but the model's residual width is 8"):
        gguf_direction(str(tmp_path / "cv.gguf"), [10], "llama", 8, False)
