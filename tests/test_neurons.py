"""The neurons study on tiny random models: a planted null-space neuron is found first and
changes entropy, not the answer; the study's numbers against references computed here (the
probe, ĉ by hand, hooked forward passes with the calibration mean); its settings and refusals."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import build_tiny, spec_of

from calibrate.core.direction import fit_direction, split_indices
from calibrate.core.metrics import option_metrics
from calibrate.core.neuron_stats import span_share
from calibrate.core.option_scores import option_probabilities
from calibrate.engine.probe import ProbeSettings, run_probe
from calibrate.errors import ConfigError
from calibrate.model.adapters import SUPPORTED_ARCHITECTURES, mlp_parts
from calibrate.model.load import wrap_model
from calibrate.studies import get_study
from calibrate.studies.job_context import JobContext
from calibrate.studies.neurons import NeuronSettings, find_candidates
from calibrate.tasks.prompts import PromptConfig, build_prompts

DATASET = PromptConfig(name="toy", answer_format="verbalizer",
                       verbalizer=[" negative", " positive"],
                       template="{question} \n question : is this sentence positive or negative ? "
                                "answer :")
WORDS = ["the", "movie", "was", "great", "a", "very", "boring", "film", "this", "is", "not", "good", "it", "bad", "fun"]
GEMMA = ("gemma", "gemma2", "gemma3_text")
LEAN = ["tracker=none", "probe.progress=false", "metrics.bootstrap=0", "direction.layers=[2,3]",
        "nullspace.n_random=20", "intervention=neurons", "intervention.n_null=6",
        "intervention.span_draws=20", "intervention.null_pool=8"]


def prompts(tokenizer, n=24, seed=0):
    rng = np.random.default_rng(seed)
    records = [SimpleNamespace(question=" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))),
                               options=("bad", "good"), label=i % 2, subject="", dataset="")
               for i in range(n)]
    return build_prompts(records, DATASET, tokenizer)


def run(lm, prompt_set, tmp_path, *overrides):
    ctx = JobContext(spec_of(*LEAN, f"cache_dir={tmp_path}", *overrides), lm, prompt_set)
    return get_study("neurons").run(ctx)


def null_direction(model, model_type: str) -> torch.Tensor:
    """Make a unit vector u an exact null direction of the unembedding (orthogonal to the
    all-ones vector, which a LayerNorm removes; the unembedding scaled up 30 times so that the
    random model's options are not all but tied), with identity final-norm gains and no biases
    after it, and no soft-capping (the fixture's cap of 0.5 saturates, leaving only float32
    rounding to compare); returns u."""
    from calibrate.model.adapters import get_adapter

    model.config.final_logit_softcapping = None
    adapter = get_adapter(model)
    u = torch.randn(adapter.unembed_weight.shape[1], generator=torch.Generator().manual_seed(7))
    u = u - u.mean()
    u = u / u.norm()
    with torch.no_grad():
        w_u = adapter.unembed.weight
        w_u -= (w_u @ u)[:, None] * u[None]
        w_u *= 30.0
        if adapter.unembed.bias is not None:
            adapter.unembed.bias.zero_()
        norm = adapter.final_norm
        norm.weight.fill_(0.0 if model_type in GEMMA else 1.0)
        if getattr(norm, "bias", None) is not None:
            norm.bias.zero_()
    return u


def plant(model, neuron: int, write: torch.Tensor) -> None:
    """Give the last block's ``neuron`` the effective output weight ``write`` (through the
    post-MLP norm's gain where there is one)."""
    from calibrate.model.adapters import get_adapter

    adapter = get_adapter(model)
    parts = mlp_parts(adapter, adapter.num_blocks)
    with torch.no_grad():
        if parts.post_norm is not None:  # the effective weight is (1 + g) * w
            write = write / (1.0 + parts.post_norm.weight)
        if parts.conv1d:
            parts.down.weight[neuron] = write
        else:
            parts.down.weight[:, neuron] = write


@pytest.mark.parametrize("model_type", SUPPORTED_ARCHITECTURES)
def test_a_planted_null_space_neuron_is_found_first_and_changes_entropy_not_the_answer(
        model_type, word_tokenizer, tmp_path):
    from calibrate.engine.neuron_ablation import neuron_pass

    model = build_tiny(model_type, len(word_tokenizer), seed=1)
    u = null_direction(model, model_type)  # tied embeddings change too: measure after this
    lm = wrap_model(model, word_tokenizer, name=f"tiny-{model_type}")
    ps = prompts(word_tokenizer)
    before = neuron_pass(lm, ps, [3], ProbeSettings(progress=False).keeping([3]))
    acts = before.activations[3]
    # the neuron whose activation varies most for its size, its write sized so that the
    # activation's range moves the last residual by about twice its norm
    spread, centre = acts.std(0), np.abs(acts.mean(0))
    neuron = int(np.argmax(spread / (centre + 1e-12)))
    size = 2 * float(np.linalg.norm(before.result.residuals[3], axis=1).mean()) / float(
        spread[neuron] + centre[neuron])
    plant(model, neuron, size * u)
    settings = NeuronSettings(top_k=2, null_pool=4)
    cands = find_candidates(lm, [2, 3], 1, tmp_path, settings)
    first = cands.table.iloc[cands.top[0]]
    assert (int(first["block"]), int(first["neuron"])) == (3, neuron)
    assert first["null_fraction"] == pytest.approx(1.0, abs=1e-6)
    assert first["logit_var"] == pytest.approx(0.0, abs=1e-9) and bool(first["entropy_candidate"])

    result = run(lm, ps, tmp_path, "nullspace.k=1", "intervention.blocks=2",
                 "intervention.top_k=2", "intervention.null_pool=4")
    assert result.report_json["candidates"][0]["arm"] == f"b3_n{neuron}"
    final = result.report_json["final"][f"b3_n{neuron}"]
    assert final["total"]["changed"] == 0.0  # every answer kept ...
    assert final["total"]["abs_delta_entropy"] > 1e-4  # ... each example's entropy moved
    # W_U reads nothing of it directly (float32 rounding of a large write aside)
    assert final["direct"]["abs_delta_entropy"] < 0.01 * final["total"]["abs_delta_entropy"]
    assert final["direct"]["changed"] == 0.0


@pytest.fixture(scope="module")
def tiny_lm(word_tokenizer):
    return wrap_model(build_tiny("llama", len(word_tokenizer), seed=3), word_tokenizer,
                      name="tiny")


def _hooked_last_logits(lm, prompt_set, block, neuron, mean):
    """[N, K] the model's own last-layer option logits with the neuron's activation at the last
    position set to ``mean`` by a hook (None: no hook)."""
    down = lm.model.model.layers[block - 1].mlp.down_proj
    seen, out = [], []

    def pre(_m, args):
        x = args[0].clone()
        seen.append(x[0, -1, neuron].item())
        if mean is not None:
            x[0, -1, neuron] = mean
        return (x, *args[1:])

    for i, prompt in enumerate(prompt_set.prompts):
        handle = down.register_forward_pre_hook(pre)
        try:
            with torch.no_grad():
                logits = lm.model(input_ids=torch.tensor([lm.tokenizer(prompt)["input_ids"]])).logits
        finally:
            handle.remove()
        out.append(logits[0, -1, prompt_set.option_ids[i]].numpy())
    return np.stack(out), np.array(seen)


def test_the_study_against_references(tiny_lm, tmp_path):
    ps = prompts(tiny_lm.tokenizer)
    result = run(tiny_lm, ps, tmp_path, "intervention.blocks=2", "intervention.top_k=3")
    cal, evaluation = split_indices(24, 0.5, 0)
    # the pass is the probe: layers.csv is the probe of the evaluation split
    probe = run_probe(tiny_lm, ps, ProbeSettings(progress=False).keeping((1, 2, 3)))
    np.testing.assert_allclose(result.report.result.option_logits,
                               probe.option_logits[evaluation], rtol=1e-4, atol=1e-4)
    assert result.summary["n_evaluation"] == len(evaluation)
    # ĉ fit on the calibration rows, by hand, without a second pass
    c_hat = fit_direction({l: probe.residuals[l][cal] for l in (1, 2, 3)}, [2, 3], "layer_diff")
    report = result.report_json
    top = [(c["block"], c["neuron"]) for c in report["candidates"]]
    weights = np.stack([mlp_parts(tiny_lm.adapter, b).out_weight[n].detach().numpy()
                        for b, n in top])
    assert report["c_hat"]["span"]["share"] == pytest.approx(span_share(c_hat.vector, weights),
                                                             abs=1e-5)
    # a candidate of the last block, mean-ablated with the calibration mean, by hooks
    block, neuron = next((b, n) for b, n in top if b == 3)
    _, acts = _hooked_last_logits(tiny_lm, ps.subset(cal), block, neuron, None)
    ablated, _ = _hooked_last_logits(tiny_lm, ps.subset(evaluation), block, neuron, acts.mean())
    want = option_metrics(option_probabilities(ablated), ps.labels[evaluation])
    row = result.table[(result.table["arm"] == f"b{block}_n{neuron}")
                       & (result.table["effect"] == "total") & (result.table["layer"] == 3)]
    assert row["ece"].iloc[0] == pytest.approx(want["ece"], abs=1e-5)
    assert row["entropy"].iloc[0] == pytest.approx(want["entropy"], abs=1e-5)
    # every arm has its layers from the lowest block up, both effects, and a null at the last
    arms = set(result.table["arm"])
    assert arms == {c["arm"] for c in report["candidates"]} | {"top_set", "frequency_set",
                                                                 "c_hat", "temperature"}
    lowest = min(c["block"] for c in report["candidates"])
    assert set(result.table.loc[result.table["arm"] == "top_set", "layer"]) == \
        set(range(lowest, 4))
    for c in report["candidates"]:  # a candidate's rows: the layers from its block up, no lower
        for effect in ("total", "direct"):
            rows = result.table[(result.table["arm"] == c["arm"])
                                & (result.table["effect"] == effect)]
            assert sorted(rows["layer"]) == list(range(c["block"], 4))
    for arm in [c["arm"] for c in report["candidates"]] + ["top_set", "frequency_set"]:
        for effect in ("total", "direct"):
            assert report["final"][arm][effect]["n_null"] == 6
            assert 0 < report["final"][arm][effect]["p_value_ece"] <= 1
    assert len(result.neurons) == 2 * tiny_lm.model.config.intermediate_size
    assert result.summary_rows() and result.headline()


def test_the_result_writes_plots_and_logs_its_files(tiny_lm, tmp_path):
    from calibrate.io.track import Tracker

    result = run(tiny_lm, prompts(tiny_lm.tokenizer), tmp_path)
    result.write(tmp_path)
    plots = result.plot(tmp_path, "tiny")
    for name in ("neurons.csv", "neurons.json", "neuron_ablation.csv", "neurons.png",
                 "neuron_ablation.png"):
        assert (tmp_path / name).is_file() and name in result.files
    assert set(plots) == {"neurons", "neuron_ablation"}
    result.log(Tracker(), tmp_path)
    flat = result.tracker_summary()
    assert "neurons/top_set/total/delta_ece" in flat and "neurons/c_hat_share_p" in flat


def test_settings_are_typed_and_checked():
    spec = spec_of("intervention=neurons", "intervention.blocks=3", "intervention.top_k=4")
    assert isinstance(spec.intervention, NeuronSettings)
    assert (spec.intervention.blocks, spec.intervention.top_k) == (3, 4)
    for override, message in [
            ("intervention.blocks=0", "intervention.blocks=0; accepted: an integer >= 1"),
            ("intervention.norm_quantile=1.5",
             "intervention.norm_quantile=1.5; accepted: a number in [0, 1]"),
            ("intervention.null_pool=2", ("intervention.null_pool=2; accepted: an integer >= "
                                          "intervention.top_k (8), so every draw of matched "
                                          "neurons can be distinct")),
            ("intervention.n_null=-1", "intervention.n_null=-1; accepted: an integer >= 0")]:
        with pytest.raises(ConfigError) as err:
            spec_of("intervention=neurons", override)
        assert str(err.value) == message


def test_shape_and_format_refusals():
    study = get_study("neurons")
    with pytest.raises(ConfigError, match=r"intervention.blocks=31; accepted: 1..30"):
        study.check_shape(spec_of("intervention=neurons", "intervention.blocks=31"), 30, 576)
    study.check_shape(spec_of("intervention=neurons", "dataset=arc_easy"), 30, 576)  # cloze
    study.check_shape(spec_of("intervention=neurons", "dataset=arc_easy",
                              "dataset.answer_format=letters"), 30, 576)


def test_other_studies_do_not_take_its_keys():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="intervention.top_k"):
        spec_of("intervention=nullspace", "intervention.top_k=3")


def test_bench_neurons_refuses_bad_counts_in_one_line_before_loading(capsys):
    from calibrate import cli

    for argv, message in ((["--n", "1"], "--n=1; accepted: an integer >= 2"),
                          (["--rounds", "0"], "--rounds=0; accepted: an integer >= 1"),
                          (["--n-null", "-3"], "--n-null=-3; accepted: an integer >= 0")):
        assert cli.main(["bench", "neurons", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [f"error: {message}"]


def _hooked_set_logits(lm, prompt_set, changes):
    """[N, K] last-layer option logits with each (block, neuron) of ``changes`` set to its value
    at the last position by a hook (value None: recorded, not changed); and the recorded
    activations {(block, neuron): [N]}."""
    seen: dict = {}
    out = []
    per_block: dict = {}
    for (block, neuron), value in changes.items():
        per_block.setdefault(block, []).append((neuron, value))
    for i, prompt in enumerate(prompt_set.prompts):
        handles = []

        def make(block, pairs):
            def pre(_m, args):
                x = args[0].clone()
                for neuron, value in pairs:
                    seen.setdefault((block, neuron), []).append(x[0, -1, neuron].item())
                    if value is not None:
                        x[0, -1, neuron] = value
                return (x, *args[1:])
            return pre

        try:
            for block, pairs in per_block.items():
                handles.append(lm.model.model.layers[block - 1].mlp.down_proj
                               .register_forward_pre_hook(make(block, pairs)))
            with torch.no_grad():
                logits = lm.model(input_ids=torch.tensor([lm.tokenizer(prompt)["input_ids"]])).logits
        finally:
            for h in handles:
                h.remove()
        out.append(logits[0, -1, prompt_set.option_ids[i]].numpy())
    return np.stack(out), {k: np.array(v) for k, v in seen.items()}


def test_the_frequency_set_is_ablated_with_its_own_null(tiny_lm, tmp_path):
    """The frequency set is the frequency_top neurons of largest |correlation| (by hand from the
    table), ablated together (a hooked pass with the calibration means) against its own matched
    null of n_null draws."""
    ps = prompts(tiny_lm.tokenizer)
    result = run(tiny_lm, ps, tmp_path, "intervention.top_k=3", "intervention.frequency_top=4")
    table, report = result.neurons, result.report_json
    order = np.argsort(-np.abs(table["frequency_corr"].to_numpy()), kind="stable")[:4]
    want = [(int(table["block"].iloc[r]), int(table["neuron"].iloc[r])) for r in order]
    assert [(c["block"], c["neuron"]) for c in report["frequency_candidates"]] == want
    cal, evaluation = split_indices(24, 0.5, 0)
    _, acts = _hooked_set_logits(tiny_lm, ps.subset(cal), {bn: None for bn in want})
    ablated, _ = _hooked_set_logits(tiny_lm, ps.subset(evaluation),
                                    {bn: acts[bn].mean() for bn in want})
    ref = option_metrics(option_probabilities(ablated), ps.labels[evaluation])
    row = result.table[(result.table["arm"] == "frequency_set")
                       & (result.table["effect"] == "total") & (result.table["layer"] == 3)]
    assert row["ece"].iloc[0] == pytest.approx(ref["ece"], abs=1e-5)
    assert row["entropy"].iloc[0] == pytest.approx(ref["entropy"], abs=1e-5)
    final = report["final"]["frequency_set"]
    for effect in ("total", "direct"):
        assert final[effect]["n_null"] == 6 and 0 < final[effect]["p_value_ece"] <= 1
    assert "frequency_set" in {r["arm"] for r in result.summary_rows()}
    # 3 candidates, the top set, the frequency set; 6 draws for each of the 3 and each set
    assert report["n_arms"] == 3 + 2 + 6 * (3 + 2)


def test_the_study_on_cloze_against_hooked_passes(tiny_lm, tmp_path):
    """Cloze: a last-block candidate ablated at every scoring position with the mean over the
    calibration split's scored terms (both by hooked full passes) gives the study's ECE; the
    probe is the cloze probe."""
    from calibrate.engine.cloze import run_cloze

    rng = np.random.default_rng(1)
    records = [SimpleNamespace(question=" ".join(rng.choice(WORDS, size=4)),
                               options=("very good fun", "bad", "not it") + (("the film",) * (i == 5)),
                               label=i % 3, subject="", dataset="")
               for i in range(16)]  # one row with 4 options: the two splits differ in width
    config = PromptConfig(name="toy", answer_format="cloze", cloze_norm="token",
                          template="{question} question : good or bad ? answer :")
    ps = build_prompts(records, config, tiny_lm.tokenizer)
    result = run(tiny_lm, ps, tmp_path, "intervention.top_k=3", "intervention.frequency_top=2")
    cal, evaluation = split_indices(16, 0.5, 0)
    assert (5 in cal) != (5 in evaluation)
    probe = run_cloze(tiny_lm, [ps.requests[i] for i in evaluation], ps.labels[evaluation],
                      ProbeSettings(progress=False), norm="token")
    got, width = result.report.result.option_logits, probe.option_logits.shape[-1]
    assert got.shape[-1] == 4  # the whole set's width
    np.testing.assert_allclose(got[..., :width], probe.option_logits, rtol=1e-5, atol=1e-5)
    assert np.all(np.isneginf(got[..., width:]))
    report = result.report_json
    block, neuron = next((c["block"], c["neuron"]) for c in report["candidates"] if c["block"] == 3)
    down = tiny_lm.model.model.layers[block - 1].mlp.down_proj

    def scored_pass(request, cont, value):
        ids, t = list(request.context_ids) + list(cont), len(request.context_ids)
        scored = slice(t - 1, t + len(cont) - 1)
        seen = []

        def pre(_m, args):
            x = args[0].clone()
            seen.extend(x[0, scored, neuron].tolist())
            if value is not None:
                x[0, scored, neuron] = value
            return (x, *args[1:])

        handle = down.register_forward_pre_hook(pre)
        try:
            with torch.no_grad():
                logits = tiny_lm.model(input_ids=torch.tensor([ids])).logits
        finally:
            handle.remove()
        lp = torch.log_softmax(logits[0, scored].double(), -1)
        return float(lp[torch.arange(len(cont)), torch.tensor(cont)].sum()) / len(cont), seen

    terms = [a for i in cal for c in ps.requests[i].continuations
             for a in scored_pass(ps.requests[i], c, None)[1]]
    mean = float(np.mean(terms))
    row_mean = result.neurons[(result.neurons["block"] == block)
                              & (result.neurons["neuron"] == neuron)]["mean_activation"].iloc[0]
    assert row_mean == pytest.approx(mean, abs=1e-5)
    scores = np.full((len(evaluation), 4), -np.inf)
    for row, i in enumerate(evaluation):
        for k, c in enumerate(ps.requests[i].continuations):
            scores[row, k] = scored_pass(ps.requests[i], c, mean)[0]
    want = option_metrics(option_probabilities(scores), ps.labels[evaluation])
    row = result.table[(result.table["arm"] == f"b{block}_n{neuron}")
                       & (result.table["effect"] == "total") & (result.table["layer"] == 3)]
    assert row["ece"].iloc[0] == pytest.approx(want["ece"], abs=1e-5)
    assert row["entropy"].iloc[0] == pytest.approx(want["entropy"], abs=1e-5)
    assert {"c_hat", "temperature", "top_set", "frequency_set"} <= set(result.table["arm"])
    assert report["final"]["top_set"]["direct"]["n_null"] == 6
