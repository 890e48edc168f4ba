"""Studies run directly on a tiny random model, against references computed here."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import build_tiny, spec_of

from calibrate.core.direction import Direction, fit_direction, split_indices
from calibrate.directions import METHODS, DirectionMethod, FitRequest, register_method
from calibrate.engine.probe import ProbeSettings, run_probe
from calibrate.model.load import wrap_model
from calibrate.studies import STUDIES, Study, StudyResult, get_study, register
from calibrate.studies.job_context import JobContext
from calibrate.tasks.prompts import PromptConfig, build_prompts

DATASET = PromptConfig(name="toy", answer_format="verbalizer",
                       verbalizer=[" negative", " positive"],
                       template="{question} \n question : is this sentence positive or negative ? "
                                "answer :")
WORDS = "the movie was great a very boring film this is not good it bad fun".split()
LAYERS = 4  # 3 blocks + embeddings


@pytest.fixture(scope="module")
def tiny_lm(word_tokenizer):
    torch.manual_seed(0)
    return wrap_model(build_tiny("llama", len(word_tokenizer), seed=3), word_tokenizer, name="tiny")


@pytest.fixture(scope="module")
def prompt_set(tiny_lm):
    rng = np.random.default_rng(0)
    records = [SimpleNamespace(question=" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))),
                               options=("bad", "good"), label=i % 2, subject="", dataset="")
               for i in range(24)]
    return build_prompts(records, DATASET, tiny_lm.tokenizer)


def context(lm, prompt_set, tmp_path, *overrides: str) -> JobContext:
    base = ["tracker=none", "probe.progress=false", "metrics.bootstrap=0", f"cache_dir={tmp_path}",
            "direction.layers=[2,3]", "nullspace.n_random=20"]
    return JobContext(spec_of(*base, *overrides), lm, prompt_set)


def test_probe_study_equals_the_probe(tiny_lm, prompt_set, tmp_path):
    ctx = context(tiny_lm, prompt_set, tmp_path)
    result = get_study("probe").run(ctx)
    direct = run_probe(tiny_lm, prompt_set, ProbeSettings(progress=False))
    np.testing.assert_allclose(result.report.result.probs, direct.probs, atol=1e-6)
    assert len(result.report.table) == LAYERS and result.summary == {}


def test_steering_study_on_its_split(tiny_lm, prompt_set, tmp_path):
    ctx = context(tiny_lm, prompt_set, tmp_path, "eta=[0,3]", "intervention=steering",
                  "intervention.layers=[2]")
    result = get_study("steering").run(ctx)
    cal, evaluation = split_indices(24, 0.5, 0)
    # ĉ by hand from the calibration rows' residuals
    probe = run_probe(tiny_lm, prompt_set, ProbeSettings(progress=False).keeping((1, 2, 3)))
    expected = fit_direction({l: probe.residuals[l][cal] for l in (1, 2, 3)}, [2, 3], "layer_diff")
    np.testing.assert_allclose(result.direction.vector, expected.vector, atol=1e-6)
    table = result.table
    zero, three = (table[table["eta"] == e].reset_index(drop=True) for e in (0.0, 3.0))
    # eta 0 is the unsteered evaluation split, the report the job writes as layers.csv
    assert result.summary["n_evaluation"] == len(evaluation) == len(result.report.result.labels)
    np.testing.assert_allclose(zero["ece"], result.report.table["ece"], atol=1e-6)
    # layers before the edit are unchanged; after it they move
    np.testing.assert_allclose(three.loc[:1, "ece"], zero.loc[:1, "ece"], atol=1e-9)
    assert not np.allclose(three.loc[2:, "ece"], zero.loc[2:, "ece"], atol=1e-6)
    assert result.summary["steering"]["3"]["delta_ece"] == pytest.approx(
        three["ece"].iloc[-1] - zero["ece"].iloc[-1])


FAST_TUNED = ("lens=tuned", "lens.steps=2", "lens.tokens_per_step=16", "lens.kl_tokens=16")


@pytest.mark.parametrize("lens", [FAST_TUNED, ("lens=affine", "lens.kl_tokens=16"),
                                  ("lens=probe", "probe.option_mass=none")])
def test_probe_study_under_a_lens_fit_on_the_prompts_reports_only_the_evaluation_split(
        tiny_lm, prompt_set, tmp_path, lens):
    ctx = context(tiny_lm, prompt_set, tmp_path, *lens)
    assert ctx.spec.uses_split and ctx.spec.study == "probe"
    result = get_study("probe").run(ctx)
    cal, evaluation = split_indices(24, 0.5, 0)
    assert result.report.result.labels.tolist() == prompt_set.labels[evaluation].tolist()
    assert result.report.prompt_set.prompts == [prompt_set.prompts[i] for i in evaluation]
    assert result.summary["n_calibration"] == len(cal) == 12
    # the lens was fit on exactly the calibration rows
    readout = ctx.readout.summary()
    fit_on = readout["fit_on"]
    assert fit_on["split"] == "calibration" and fit_on["rows"] == len(cal)
    if "n_sequences" in fit_on:
        tokens = tiny_lm.tokenizer([prompt_set.prompts[i] for i in cal])["input_ids"]
        assert fit_on["tokens"] == sum(len(t) for t in tokens)
    # what it reads is the lens's read of the evaluation rows (not the logit lens's)
    direct = run_probe(tiny_lm, prompt_set.subset(evaluation),
                       ProbeSettings(progress=False, option_mass="none"), ctx.readout)
    np.testing.assert_allclose(result.report.result.probs, direct.probs, atol=1e-6)
    plain = run_probe(tiny_lm, prompt_set.subset(evaluation), ProbeSettings(progress=False))
    assert not np.allclose(direct.probs[:, :-1], plain.probs[:, :-1], atol=1e-6)


def test_a_lens_from_a_text_file_reads_every_row(tiny_lm, prompt_set, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the movie was great\n\nthis film is not good\n\nit was fun")
    ctx = context(tiny_lm, prompt_set, tmp_path, *FAST_TUNED, f"lens.text_path={text}")
    assert not ctx.spec.uses_split
    result = get_study("probe").run(ctx)
    assert len(result.report.result.labels) == 24 and result.summary == {}
    assert ctx.readout.summary()["fit_on"]["text"] == "file"


@pytest.mark.parametrize("lens", [FAST_TUNED, ("lens=probe", "probe.option_mass=none")])
def test_steering_reads_every_layer_through_the_lens(tiny_lm, prompt_set, tmp_path, lens):
    plain = get_study("steering").run(context(
        tiny_lm, prompt_set, tmp_path, "eta=[0,3]", "intervention=steering",
        "intervention.layers=[2]", "direction.n_random=4"))
    ctx = context(tiny_lm, prompt_set, tmp_path, "eta=[0,3]", "intervention=steering",
                  "intervention.layers=[2]", "direction.n_random=4", *lens)
    result = get_study("steering").run(ctx)
    np.testing.assert_allclose(result.direction.vector, plain.direction.vector, atol=1e-9)
    _, evaluation = split_indices(24, 0.5, 0)
    base = run_probe(tiny_lm, prompt_set.subset(evaluation),
                     ProbeSettings(progress=False, option_mass="none"), ctx.readout)
    zero = result.table[result.table["eta"] == 0.0].reset_index(drop=True)
    from calibrate.core.metrics import layer_table

    np.testing.assert_allclose(zero["ece"], layer_table(base.probs, base.labels)["ece"], atol=1e-6)
    if lens is FAST_TUNED:  # the last layer is the model's own output under the tuned lens
        last = plain.table[plain.table["eta"] == 3.0]["ece"].iloc[-1]
        assert result.table[result.table["eta"] == 3.0]["ece"].iloc[-1] == pytest.approx(last,
                                                                                         abs=1e-6)


@pytest.mark.parametrize("name, variants", [("nullspace", ["none", "nullspace", "random"]),
                                            ("direction_ablate", ["none", "direction", "random"])])
def test_ablation_studies(tiny_lm, prompt_set, tmp_path, name, variants):
    ctx = context(tiny_lm, prompt_set, tmp_path, f"intervention={name}", "nullspace.k=4")
    result = get_study(name).run(ctx)
    assert list(result.table["variant"].unique()) == variants
    none = result.table[result.table["variant"] == "none"].reset_index(drop=True)
    np.testing.assert_allclose(none["ece"], result.report.table["ece"], atol=1e-6)
    assert result.summary["intervention"] == name
    if name == "nullspace":
        report = result.ablation_report
        assert report["k"] == 4 and 0 <= report["rho"] <= 1 and 0 <= report["p_value"] <= 1


@pytest.mark.parametrize("name, variant", [("nullspace", "nullspace"),
                                           ("direction_ablate", "direction")])
def test_ablation_studies_read_every_layer_through_the_lens(tiny_lm, prompt_set, tmp_path, name,
                                                            variant):
    edit = (f"intervention={name}", "nullspace.k=4", "intervention.layers=[1]",
            "nullspace.n_control=3")
    plain = get_study(name).run(context(tiny_lm, prompt_set, tmp_path, *edit))
    ctx = context(tiny_lm, prompt_set, tmp_path, *edit, *FAST_TUNED)
    result = get_study(name).run(ctx)
    from calibrate.core.metrics import layer_table

    _, evaluation = split_indices(24, 0.5, 0)
    base = run_probe(tiny_lm, prompt_set.subset(evaluation),
                     ProbeSettings(progress=False, option_mass="none"), ctx.readout)
    rows = {v: t.reset_index(drop=True) for v, t in result.table.groupby("variant")}
    was = {v: t.reset_index(drop=True) for v, t in plain.table.groupby("variant")}
    # no ablation: the lens's read of the evaluated rows
    np.testing.assert_allclose(rows["none"]["ece"], layer_table(base.probs, base.labels)["ece"],
                               atol=1e-6)
    # below the edit the ablated arm is the unablated one; above it the lens reads the edited
    # residual, differently from the logit lens below the last layer and identically at the last
    np.testing.assert_allclose(rows[variant]["ece"].iloc[:1], rows["none"]["ece"].iloc[:1],
                               atol=1e-9)
    for arm in ("none", variant, "random"):
        assert rows[arm]["ece"].iloc[-1] == pytest.approx(was[arm]["ece"].iloc[-1], abs=1e-6)
        assert rows[arm]["accuracy"].iloc[-1] == pytest.approx(was[arm]["accuracy"].iloc[-1])
    assert not np.allclose(rows[variant]["ece"].iloc[1:-1], was[variant]["ece"].iloc[1:-1],
                           atol=1e-6)


def test_the_registry_finds_and_refuses(tiny_lm, prompt_set, tmp_path):
    assert {"probe", "steering", "nullspace", "direction_ablate"} <= set(STUDIES)
    with pytest.raises(KeyError, match=r"study 'nope'; accepted: baselines, direction_ablate, neurons, nullspace"):
        get_study("nope")
    # the study names are the intervention= options (no YAML files); the old names are gone
    from calibrate.config.compose import group_options

    assert set(STUDIES) <= set(group_options("intervention"))
    assert not {"none", "direction"} & set(group_options("intervention"))
    assert spec_of("intervention=probe").study == "probe"
    assert spec_of("eta=[0,3]").study == "steering"  # eta alone composes the steering study


def test_a_new_study_is_one_class(tiny_lm, prompt_set, tmp_path):
    """A study registered by a test runs on the same context services."""
    @register
    class FinalOnly(Study):
        name = "final_only_for_test"

        def run(self, ctx):
            result = ctx.probe()
            return StudyResult(ctx.report(result.take(ctx.split()[1]),
                                          ctx.prompt_set.subset(ctx.split()[1])),
                               {"final_accuracy": float(ctx.measure(result)["accuracy"].iloc[-1])})

    try:
        ctx = context(tiny_lm, prompt_set, tmp_path, "intervention=final_only_for_test")
        assert ctx.spec.study == "final_only_for_test"  # registering made it an option
        result = get_study(ctx.spec.study).run(ctx)
        assert len(result.report.result.labels) == 12
        assert 0.0 <= result.summary["final_accuracy"] <= 1.0
    finally:
        from hydra.core.config_store import ConfigStore

        STUDIES.pop("final_only_for_test")
        ConfigStore.instance().repo["intervention"].pop("final_only_for_test.yaml", None)


def test_a_direction_method_receives_the_context_and_may_run_the_model(tiny_lm, prompt_set,
                                                                         tmp_path):
    seen = {}

    @register_method
    class FirstAxis(DirectionMethod):
        name = "first_axis_for_test"

        def fit(self, request: FitRequest) -> Direction:
            seen["residuals"] = request.residuals()
            seen["ran"] = request.probe(request.prompt_set, []).probs.shape
            vector = np.zeros(request.loaded.adapter.unembed_weight.shape[1])
            vector[0] = 1.0
            return Direction(vector, {"method": "first_axis_for_test", "layers": request.layers})

    try:
        ctx = context(tiny_lm, prompt_set, tmp_path, "eta=[0,2]",
                      "direction.method=first_axis_for_test")
        result = get_study("steering").run(ctx)
        assert result.direction.vector[0] == 1.0
        assert sorted(seen["residuals"]) == [1, 2, 3]
        assert all(v.shape[0] == 12 for v in seen["residuals"].values())
        assert seen["ran"] == (24, LAYERS, 2)
    finally:
        METHODS.pop("first_axis_for_test")


def test_baselines_study_fits_on_calibration_and_scores_evaluation(tiny_lm, prompt_set, tmp_path):
    from calibrate.core.metrics import layer_table
    from calibrate.core.posthoc import apply_temperature, fit_temperature

    ctx = context(tiny_lm, prompt_set, tmp_path, "intervention=baselines")
    result = get_study("baselines").run(ctx)
    table = result.table
    assert sorted(table["method"].unique()) == ["bias", "ensemble", "histogram", "isotonic",
                                                "temperature", "vector"]
    assert len(table) == 6 * LAYERS
    cal, evaluation = split_indices(24, 0.5, 0)
    logits = run_probe(tiny_lm, prompt_set, ProbeSettings(progress=False)).option_logits
    t = fit_temperature(logits[cal, -1], prompt_set.labels[cal])
    scaled = apply_temperature(logits[evaluation, -1], t)[:, None, :]
    expected = layer_table(scaled, prompt_set.labels[evaluation], n_bins=15, extra_bins=())
    final = table[(table["method"] == "temperature") & (table["layer"] == LAYERS - 1)].iloc[0]
    assert final["parameter"] == pytest.approx(t, rel=1e-4)
    assert final["ece"] == pytest.approx(expected["ece"].iloc[0], abs=1e-6)
    assert final["accuracy"] == final["accuracy_before"]  # temperature keeps every prediction
    assert final["ece_before"] == pytest.approx(result.report.table["ece"].iloc[-1], abs=1e-9)
    assert result.summary["baselines"]["temperature"]["ece"] == pytest.approx(final["ece"])


def test_baselines_settings_are_checked_when_the_spec_is_built():
    from calibrate.errors import ConfigError

    with pytest.raises(ConfigError, match=r"baselines.methods=\['platt'\]; accepted: a "
                                          r"non-empty list of temperature, histogram"):
        spec_of("intervention=baselines", "baselines.methods=[platt]")


def test_steering_deltas_carry_paired_intervals(tiny_lm, prompt_set, tmp_path):
    """Steering at the last layer: only that layer's cells can differ (1 η ≠ 0 -> 1 cell), they
    get metrics.paired_bootstrap replicates, a p-value and its correction; below the edit every
    interval is exactly 0 and nothing is tested."""
    ctx = context(tiny_lm, prompt_set, tmp_path, "eta=[0,3]", "metrics.bootstrap=60",
                  "metrics.paired_bootstrap=500", "metrics.correction=bonferroni")
    result = get_study("steering").run(ctx)
    table = result.table
    zero = table[table["eta"] == 0.0]
    assert (zero[["delta_ece_lo", "delta_ece_hi"]].to_numpy() == 0).all()
    three = table[table["eta"] == 3.0].reset_index(drop=True)
    assert (three["delta_ece_lo"] <= three["delta_ece_hi"]).all()
    assert three["tested"].tolist() == [False, False, False, True]
    assert (three.loc[:2, ["delta_ece_lo", "delta_ece_hi"]].to_numpy() == 0).all()
    assert three["p_ece"].isna().tolist() == [True, True, True, False]
    assert three.loc[3, "p_ece"] >= 2 / 501
    comparisons = result.summary["comparisons"]
    assert comparisons["cells_tested"] == 1 and comparisons["layers_tested"] == [LAYERS - 1]
    assert comparisons["bonferroni_alpha"] == pytest.approx(0.05)
    assert comparisons["correction"] == "bonferroni" and comparisons["n_boot_tested"] == 500
    assert comparisons["flagged_ece"] == int(three["significant_ece"].sum())
    assert comparisons["flagged_adjusted_ece"] == int(three["significant_adjusted_ece"].sum())
    final = result.summary["steering"]["3"]
    assert final["delta_ece_lo"] == pytest.approx(three["delta_ece_lo"].iloc[-1])
    assert final["p_adjusted_ece"] == pytest.approx(three["p_adjusted_ece"].iloc[-1])
    assert isinstance(final["significant_ece"], bool)
    assert isinstance(final["significant_adjusted_ece"], bool)


def test_an_edit_below_the_last_layer_tests_the_layers_from_the_edit_up(tiny_lm, prompt_set,
                                                                      tmp_path):
    """Edited at layer 2 with two η ≠ 0: 2 layers (2, 3) × 2 η = 4 cells, Holm over those 4."""
    from calibrate.core.paired import adjust_p_values

    ctx = context(tiny_lm, prompt_set, tmp_path, "eta=[0,3,-3]", "metrics.bootstrap=40",
                  "metrics.paired_bootstrap=300", "intervention.layers=[2]",
                  "direction.n_random=0")
    result = get_study("steering").run(ctx)
    table, comparisons = result.table, result.summary["comparisons"]
    tested = table[table["tested"]]
    assert sorted(zip(tested["eta"], tested["layer"])) == [(-3.0, 2), (-3.0, 3), (3.0, 2),
                                                           (3.0, 3)]
    assert comparisons["cells_tested"] == 4 and comparisons["layers_tested"] == [2, 3]
    assert comparisons["correction"] == "holm"
    np.testing.assert_allclose(tested["p_adjusted_ece"],
                               adjust_p_values(tested["p_ece"].to_numpy(), "holm"))


def test_random_direction_null_without_forward_passes_matches_the_steered_pass(
        tiny_lm, prompt_set, tmp_path):
    """At the last layer the null reads the edited residual through the lens; for ĉ itself that
    must equal the real steered forward pass (steering.csv's final layer)."""
    ctx = context(tiny_lm, prompt_set, tmp_path, "eta=[0,3,-3]", "direction.n_random=8")
    result = get_study("steering").run(ctx)
    null = result.null
    assert list(null["eta"]) == [3.0, -3.0] and (null["n_random"] == 8).all()
    final = result.table[result.table["layer"] == LAYERS - 1].set_index("eta")
    for row in null.itertuples():
        assert row.c_hat_delta_ece == pytest.approx(final.loc[row.eta, "delta_ece"], abs=1e-6)
        assert row.c_hat_delta_accuracy == pytest.approx(final.loc[row.eta, "delta_accuracy"])
        assert row.null_delta_ece_p05 <= row.null_delta_ece_median <= row.null_delta_ece_p95
        assert 1 / 9 <= row.p_value_ece <= 1.0
    assert result.summary["null"]["n_random"] == 8


def test_random_direction_null_off_the_last_layer_equals_full_steered_passes(
        tiny_lm, prompt_set, tmp_path):
    """At an earlier layer every random direction runs only the blocks above the edit; its band
    equals the one from full forward passes of each direction, and ĉ's row equals steering.csv."""
    from calibrate.core.random_null import _final_metrics, null_vectors
    from calibrate.engine.edits import Steering
    from calibrate.engine.steer import run_steered

    ctx = context(tiny_lm, prompt_set, tmp_path, "intervention=steering", "eta=[0,3]",
                  "intervention.layers=[2]", "direction.n_random=6")
    result = get_study("steering").run(ctx)
    row = result.null.iloc[0]
    final = result.table[result.table["layer"] == LAYERS - 1].set_index("eta")
    assert row.c_hat_delta_ece == pytest.approx(final.loc[3.0, "delta_ece"], abs=1e-6)
    _, evaluation = split_indices(24, 0.5, 0)
    eval_set = prompt_set.subset(evaluation)
    deltas = []
    for vec in null_vectors(result.direction.vector, 6, ctx.spec.direction.seed + 1)[1:]:
        full = run_steered(tiny_lm, eval_set, Steering(vec, (2,), (0.0, 3.0)),
                           ProbeSettings(progress=False), use_cache=False)[:, :, -1]
        ece = _final_metrics(full, eval_set.labels, 15, "guo")["ece"]
        deltas.append(ece[1] - ece[0])
    lo, median, hi = np.quantile(deltas, [0.05, 0.5, 0.95])
    assert (row.null_delta_ece_p05, row.null_delta_ece_median, row.null_delta_ece_p95) == \
        pytest.approx((lo, median, hi), abs=1e-6)
    assert result.summary["null"]["layers"] == [2]
    # ĉ's rows come from the same sweep: they equal ĉ steered alone in full forward passes
    alone = run_steered(tiny_lm, eval_set, Steering(result.direction.vector, (2,), (0.0, 3.0)),
                        ProbeSettings(progress=False), use_cache=False)
    from calibrate.core.deltas import steering_table
    reference = steering_table(alone, eval_set.labels, [0.0, 3.0], 15, "guo", 0)
    np.testing.assert_allclose(result.table["ece"], reference["ece"], atol=1e-6)
    np.testing.assert_allclose(result.table["accuracy"], reference["accuracy"], atol=1e-9)


def test_random_direction_null_is_skipped_with_a_reason_at_every_position(
        tiny_lm, prompt_set, tmp_path):
    ctx = context(tiny_lm, prompt_set, tmp_path, "intervention=steering", "eta=[0,3]",
                  "intervention.layers=[2]", "intervention.position=all")
    result = get_study("steering").run(ctx)
    assert result.null is None
    assert "intervention.position=all" in result.summary["null"]["skipped"]


def test_cloze_null_at_the_last_layer_equals_full_cloze_passes(tiny_lm, tmp_path):
    """Cloze steered at the last layer: the null rereads only the context's last state; its band
    equals full cloze passes of each random direction, ĉ's row equals steering.csv."""
    from calibrate.core.random_null import _final_metrics, null_vectors
    from calibrate.engine.cloze import run_cloze_steered
    from calibrate.engine.edits import Steering
    from calibrate.tasks.data import MCRecord

    rng = np.random.default_rng(1)
    records = [MCRecord(" ".join(rng.choice(WORDS, size=4)), ("very good fun", "bad", "not it"),
                        i % 3) for i in range(16)]
    cloze = PromptConfig(name="toy", answer_format="cloze", cloze_norm="none",
                         template="{question} question : good or bad ? answer :")
    prompts = build_prompts(records, cloze, tiny_lm.tokenizer)
    ctx = context(tiny_lm, prompts, tmp_path, "eta=[0,4]", "direction.n_random=5",
                  "direction.layers=[2,3]")
    result = get_study("steering").run(ctx)
    row = result.null.iloc[0]
    final = result.table[result.table["layer"] == LAYERS - 1].set_index("eta")
    assert row.c_hat_delta_ece == pytest.approx(final.loc[4.0, "delta_ece"], abs=1e-6)
    _, evaluation = split_indices(16, 0.5, 0)
    eval_set = prompts.subset(evaluation)
    deltas = []
    for vec in null_vectors(result.direction.vector, 5, ctx.spec.direction.seed + 1)[1:]:
        full = run_cloze_steered(tiny_lm, list(eval_set.requests), Steering(vec, (3,), (0.0, 4.0)),
                                 ProbeSettings(progress=False), use_cache=False)[:, :, -1]
        ece = _final_metrics(full, eval_set.labels, 15, "guo")["ece"]
        deltas.append(ece[1] - ece[0])
    assert row.null_delta_ece_median == pytest.approx(np.median(deltas), abs=1e-6)


def test_subspace_control_off_the_last_layer_equals_full_ablated_passes(
        tiny_lm, prompt_set, tmp_path):
    from calibrate.core.random_null import _final_metrics, random_bases
    from calibrate.engine.steer import run_steered
    from calibrate.studies.subspace_ablation import SubspaceAblation

    ctx = context(tiny_lm, prompt_set, tmp_path, "intervention=nullspace", "nullspace.k=4",
                  "nullspace.n_control=5", "intervention.layers=[2]")
    result = get_study("nullspace").run(ctx)
    null = result.ablation_report["control_null"]
    _, evaluation = split_indices(24, 0.5, 0)
    eval_set = prompt_set.subset(evaluation)
    bases = random_bases(tiny_lm.adapter.unembed_weight.shape[1], 4, 5, ctx.spec.nullspace.seed + 1)
    full = run_steered(tiny_lm, eval_set, SubspaceAblation(tuple(bases), (2,)),
                       ProbeSettings(progress=False), use_cache=False)[:, :, -1]
    ece = _final_metrics(full, eval_set.labels, 15, "guo")["ece"]
    assert null["control_delta_ece_median"] == pytest.approx(np.median(ece[1:] - ece[0]), abs=1e-6)
    assert null["n_control"] == 5 and null["layers"] == [2]


def test_steering_shows_the_baselines_beside_every_eta(tiny_lm, prompt_set, tmp_path):
    steer = get_study("steering").run(context(tiny_lm, prompt_set, tmp_path, "eta=[0,3]"))
    alone = get_study("baselines").run(context(tiny_lm, prompt_set, tmp_path,
                                               "intervention=baselines"))
    pd_testing = pytest.importorskip("pandas").testing
    pd_testing.assert_frame_equal(steer.baselines, alone.table)  # same split, same fits
    assert steer.summary["baselines_layer"] == LAYERS - 1
    assert steer.summary["baselines"]["temperature"]["ece"] == pytest.approx(
        alone.summary["baselines"]["temperature"]["ece"])


def test_nullspace_truncation_against_many_random_subspaces(tiny_lm, prompt_set, tmp_path):
    """The fast last-layer truncation equals the real ablated pass; the control null has its
    band and p-value."""
    from calibrate.core import nullspace as ns
    from calibrate.core.random_null import _final_metrics
    from calibrate.engine.last_layer import last_layer_truncated_logits

    ctx = context(tiny_lm, prompt_set, tmp_path, "intervention=nullspace", "nullspace.k=4",
                  "nullspace.n_control=12")
    result = get_study("nullspace").run(ctx)
    null = result.ablation_report["control_null"]
    assert null["n_control"] == 12 and 1 / 13 <= null["p_value_ece"] <= 1.0
    assert null["control_delta_ece_p05"] <= null["control_delta_ece_median"] <= \
        null["control_delta_ece_p95"]
    # the fast path on U_k itself reproduces the ablated pass at the last layer
    _, evaluation = split_indices(24, 0.5, 0)
    probe = run_probe(tiny_lm, prompt_set, ProbeSettings(progress=False).keeping((LAYERS - 1,)))
    basis, _ = ns.null_space(tiny_lm.adapter.unembed_weight.detach().cpu(), 4)
    eval_set = prompt_set.subset(evaluation)
    fast = last_layer_truncated_logits(tiny_lm, probe.residuals[LAYERS - 1][evaluation],
                                       eval_set.option_ids, [basis.numpy()])
    ece = _final_metrics(fast, eval_set.labels, 15, "guo")["ece"][0]
    table = result.table
    real = table[(table["variant"] == "nullspace") & (table["layer"] == LAYERS - 1)]["ece"].iloc[0]
    assert ece == pytest.approx(real, abs=1e-6)


def test_split_warns_once_of_repeated_records_on_both_sides(tiny_lm, tmp_path, caplog):
    """A record repeated in the data can land in the calibration and the evaluation split: the
    job's split says how many groups of copies straddle it (counted here from the split)."""
    import logging

    words = WORDS * 2
    records = [SimpleNamespace(question=" ".join(words[i:i + 3]), options=("bad", "good"),
                               label=i % 2, subject="") for i in range(12)]
    records += [SimpleNamespace(**vars(records[i])) for i in range(6)]  # rows 12-17 repeat 0-5
    ps = build_prompts(records, DATASET, tiny_lm.tokenizer)
    assert ps.data_checks.duplicate_groups == tuple((i, 12 + i) for i in range(6))
    ctx = context(tiny_lm, ps, tmp_path)
    cal, ev = split_indices(18, ctx.spec.direction.calibration_fraction, ctx.spec.direction.seed)
    straddle = sum((i in cal) != (12 + i in cal) for i in range(6))
    assert straddle > 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="calibrate"):
        got = ctx.split()
        again = ctx.split()
    assert [a.tolist() for a in got] == [cal.tolist(), ev.tolist()] == [a.tolist() for a in again]
    assert [r.getMessage() for r in caplog.records] == [(
        f"{straddle} group(s) of repeated records (same question and options) have copies in "
        "both the calibration and the evaluation split: the direction is fit on items it is then "
        "evaluated on")]


def _hooked_final_probs(lm, prompt_set, rows, edits):
    """Option probabilities of the model's own last-position logits, one prompt at a time (no
    padding), with ``edits[layer]`` (a vector) added to the output of block ``layer`` (our layer
    numbering) at the last position by forward hooks on the model's own blocks."""
    model, blocks = lm.model, lm.adapter.blocks
    handles = []

    def hook_for(vector):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[:, -1] += torch.as_tensor(vector, dtype=hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    for layer, vector in edits.items():
        handles.append(blocks[layer - 1].register_forward_hook(hook_for(vector)))
    try:
        out = []
        with torch.no_grad():
            for row in rows:
                ids = lm.tokenizer(prompt_set.prompts[row], return_tensors="pt")["input_ids"]
                logits = model(input_ids=ids).logits[0, -1].double()
                out.append(torch.softmax(logits[prompt_set.option_ids[row]], -1).numpy())
    finally:
        for handle in handles:
            handle.remove()
    return np.stack(out)


def test_residual_norm_eta_scales_each_edited_layer_by_its_own_norm(tiny_lm, prompt_set,
                                                                      tmp_path):
    """A two-layer edit in residual-norm units adds η · n_ℓ · ĉ at each layer ℓ, n_ℓ the mean
    residual norm of layer ℓ itself on the calibration rows (computed here from the model's own
    hidden states), against forward hooks on the model's blocks: neither the neighbouring
    layer's norm nor the last edited layer's norm for both would give these probabilities."""
    from calibrate.core.metrics import layer_table

    eta = 0.5
    model = build_tiny("llama", len(tiny_lm.tokenizer), seed=3)
    with torch.no_grad():  # block 2 writes 40 times more: its layer's residual norm is larger
        model.model.layers[1].mlp.down_proj.weight.mul_(40.0)
    tiny_lm = wrap_model(model, tiny_lm.tokenizer, name="tiny-scaled")
    ctx = context(tiny_lm, prompt_set, tmp_path, "intervention=steering", f"eta=[0,{eta}]",
                  "intervention.layers=[1,2]", "intervention.eta_scale=residual_norm",
                  "direction.n_random=0")
    result = get_study("steering").run(ctx)
    cal, evaluation = split_indices(24, 0.5, 0)
    norms = {1: [], 2: []}
    with torch.no_grad():
        for row in cal:
            ids = tiny_lm.tokenizer(prompt_set.prompts[row], return_tensors="pt")["input_ids"]
            hidden = tiny_lm.model(input_ids=ids, output_hidden_states=True).hidden_states
            for layer, values in norms.items():
                values.append(float(hidden[layer][0, -1].double().norm()))
    scale = {layer: float(np.mean(values)) for layer, values in norms.items()}
    assert scale[2] > 1.5 * scale[1]  # the two layers' units differ
    c_hat = result.direction.vector
    expected = _hooked_final_probs(tiny_lm, prompt_set, evaluation,
                                   {l: eta * scale[l] * c_hat for l in (1, 2)})
    table = layer_table(expected[:, None], prompt_set.labels[evaluation], n_bins=15)
    steered = result.table[(result.table["eta"] == eta)
                           & (result.table["layer"] == LAYERS - 1)].iloc[0]
    for metric in ("confidence", "ece", "accuracy"):
        assert steered[metric] == pytest.approx(table[metric].iloc[0], abs=1e-5), metric
    assert result.direction.meta["layer_scale"] == pytest.approx(scale, rel=1e-5)
    # the reference can tell the units apart: the swapped scales move the confidence
    swapped = _hooked_final_probs(tiny_lm, prompt_set, evaluation,
                                  {1: eta * scale[2] * c_hat, 2: eta * scale[1] * c_hat})
    assert abs(swapped.max(-1).mean() - steered["confidence"]) > 1e-4


@pytest.mark.parametrize("unit", ["absolute", "residual_norm"])
def test_matched_effect_null_against_full_steered_passes(tiny_lm, prompt_set, tmp_path, unit):
    """Each random direction is steered at the η whose mean KL to the unsteered output equals
    ĉ's: checked by full forward passes of every random direction at its matched η (their KL
    equals ĉ's, their ΔECE band and the p-value follow), and ĉ's KL by its own full pass."""
    from calibrate.core.effects import effect
    from calibrate.core.random_null import _final_metrics
    from calibrate.engine.edits import Steering
    from calibrate.engine.steer import run_steered

    n = 6
    eta = 3.0 if unit == "absolute" else 20.0
    ctx = context(tiny_lm, prompt_set, tmp_path, f"eta=[0,{eta}]", f"direction.n_random={n}",
                  "direction.match=kl", "direction.match_tol=1e-5",
                  f"intervention.eta_scale={unit}")
    result = get_study("steering").run(ctx)
    eta = eta * (result.direction.meta["layer_scale"] or {}).get(LAYERS - 1, 1.0)
    row = result.null.iloc[0]
    assert row["effect"] == "kl" and row["n_matched"] == n
    _, evaluation = split_indices(24, 0.5, 0)
    eval_set = prompt_set.subset(evaluation)
    last = LAYERS - 1

    def final(vec, e):
        return run_steered(tiny_lm, eval_set, Steering(vec, (last,), (0.0, e)),
                           ProbeSettings(progress=False), use_cache=False)[:, :, -1]

    own = final(result.direction.vector, eta)
    assert row["c_hat_effect"] == pytest.approx(float(effect(own[1], own[0], "kl")), rel=1e-4)
    draws = result.null_draws.set_index("direction")["matched_multiple"]
    deltas = []
    for d, vec in enumerate(result.null_vectors[1:], start=1):
        out = final(vec, eta * draws[d])
        assert float(effect(out[1], out[0], "kl")) == pytest.approx(row["c_hat_effect"],
                                                                    rel=1e-3)
        ece = _final_metrics(out, eval_set.labels, 15, "guo")["ece"]
        deltas.append(ece[1] - ece[0])
    assert row["matched_delta_ece_median"] == pytest.approx(np.median(deltas), abs=1e-5)
    below = sum(d <= row["c_hat_delta_ece"] for d in deltas)
    assert row["p_matched_ece"] == pytest.approx((1 + below) / (1 + n))
    assert row["matched_scale_median"] == pytest.approx(float(np.median(draws)))


def test_covariance_null_draws_lie_in_the_span_of_the_calibration_residuals(tiny_lm, prompt_set,
                                                                          tmp_path):
    """direction.null=covariance draws from N(0, Σ) of the calibration rows' last-layer
    residuals: 12 rows span at most 11 centred dimensions of 32, and every draw lies there;
    the isotropic draws do not."""
    cal, _ = split_indices(24, 0.5, 0)
    probe = run_probe(tiny_lm, prompt_set, ProbeSettings(progress=False).keeping((LAYERS - 1,)))
    centred = probe.residuals[LAYERS - 1][cal].astype(np.float64)
    centred = centred - centred.mean(axis=0)
    basis = np.linalg.svd(centred, full_matrices=False)[2][:len(cal) - 1]  # [11, 32]

    def off_span(vectors):
        return np.linalg.norm(vectors - vectors @ basis.T @ basis, axis=1)

    for kind, inside in (("covariance", True), ("isotropic", False)):
        ctx = context(tiny_lm, prompt_set, tmp_path, "eta=[0,3]", "direction.n_random=20",
                      f"direction.null={kind}", "direction.match=none")
        result = get_study("steering").run(ctx)
        randoms = result.null_vectors[1:]
        np.testing.assert_allclose(np.linalg.norm(randoms, axis=1), 1.0, rtol=1e-12)
        assert (off_span(randoms) < 1e-6).all() == inside
        assert result.summary["null"]["null"] == kind
        assert result.summary["null"]["matched_skipped"] == "direction.match=none"


def test_the_number_of_random_directions_follows_the_path(tiny_lm, prompt_set, tmp_path):
    """Unset, direction.n_random is n_random_read (1000) where the null is a read of the last
    layer and n_random_pass (32) where every direction runs blocks; the p-value's resolution
    1 / (n + 1) is reported."""
    read = get_study("steering").run(context(tiny_lm, prompt_set, tmp_path, "eta=[0,3]",
                                             "direction.match=none"))
    assert read.summary["null"]["n_random"] == 1000 and read.summary["null"]["path"] == "read"
    assert read.null["p_resolution"].iloc[0] == pytest.approx(1 / 1001)
    passes = get_study("steering").run(context(tiny_lm, prompt_set, tmp_path, "eta=[0,3]",
                                               "intervention.layers=[2]"))
    assert passes.summary["null"]["n_random"] == 32 and passes.summary["null"]["path"] == "forward"
    assert "below the last layer" in passes.summary["null"]["matched_skipped"]
    assert passes.null["p_resolution"].iloc[0] == pytest.approx(1 / 33)


def test_what_c_hat_does_against_full_steered_passes(tiny_lm, prompt_set, tmp_path):
    """effects.csv: ĉ's own row equals steering.csv's final ΔECE and the KL of its full steered
    pass; T(η) is the temperature that best turns the unsteered scores into the steered ones
    (grid search here); the zeroed variants are ĉ with those coordinates set to 0, not
    rescaled, steered like ĉ (full passes here)."""
    from calibrate.core.effects import effect, example_kl
    from calibrate.core.random_null import _final_metrics
    from calibrate.engine.edits import Steering
    from calibrate.engine.steer import run_steered

    eta = 3.0
    ctx = context(tiny_lm, prompt_set, tmp_path, f"eta=[0,{eta}]", "direction.n_random=0",
                  "direction.coordinates.top_k=4", "direction.coordinates.massive_ratio=2")
    result = get_study("steering").run(ctx)
    effects = result.effects.set_index("variant")
    coords = result.summary["direction"]["coordinates"]
    c_hat = result.direction.vector
    top = coords["top_coordinates"]
    assert len(top) == 4 and coords["share_top_k"] == pytest.approx(float(np.sum(c_hat[top] ** 2)))
    _, evaluation = split_indices(24, 0.5, 0)
    eval_set = prompt_set.subset(evaluation)
    last = LAYERS - 1

    def final(vec):
        return run_steered(tiny_lm, eval_set, Steering(vec, (last,), (0.0, eta)),
                           ProbeSettings(progress=False), use_cache=False)[:, :, -1]

    own = final(c_hat)
    row = effects.loc["c_hat"]
    final_row = result.table[(result.table["eta"] == eta) & (result.table["layer"] == last)]
    assert row["delta_ece"] == pytest.approx(final_row["delta_ece"].iloc[0], abs=1e-6)
    assert row["kl"] == pytest.approx(float(effect(own[1], own[0], "kl")), rel=1e-4)
    grid = np.exp(np.linspace(-3, 3, 6001))
    losses = [example_kl(own[1], own[0] / t).mean() for t in grid]
    assert row["temperature"] == pytest.approx(grid[int(np.argmin(losses))], rel=2e-3)
    assert row["residual_kl"] == pytest.approx(min(losses), rel=1e-3, abs=1e-9)
    assert result.summary["steering"][f"{eta:g}"]["temperature"] == row["temperature"]
    without = c_hat.copy()
    without[top] = 0.0
    zeroed = final(without)
    ece = _final_metrics(zeroed, eval_set.labels, 15, "guo")["ece"]
    assert effects.loc["without_top_k", "delta_ece"] == pytest.approx(ece[1] - ece[0], abs=1e-6)
    assert effects.loc["without_top_k", "kl"] == pytest.approx(
        float(effect(zeroed[1], zeroed[0], "kl")), rel=1e-4)
    assert ("without_massive" in effects.index) == bool(coords["massive_coordinates"])


def test_eta_fit_steers_a_gradient_direction_at_its_fitted_norm(tiny_lm, prompt_set, tmp_path):
    """eta=[0,fit] adds the gradient fit's own norm (in residual-norm units: divided by the fit
    layer's mean residual norm) to the η the job runs; other methods are refused up front."""
    from calibrate.errors import ConfigError

    ctx = context(tiny_lm, prompt_set, tmp_path, "eta=[0,0.5,fit]", "direction.method=gradient",
                  "direction.gradient.max_steps=30", "direction.gradient.holdout_fraction=0",
                  "direction.n_random=0",
                  "intervention.eta_scale=residual_norm")
    result = get_study("steering").run(ctx)
    meta = result.direction.meta
    expected = meta["eta_fit"] / meta["residual_scale"]
    assert result.summary["eta_fit"] == pytest.approx(expected)
    assert result.etas == (0.0, 0.5, pytest.approx(expected))
    assert sorted(result.table["eta"].unique()) == sorted([0.0, 0.5, result.summary["eta_fit"]])
    with pytest.raises(ConfigError, match=r"eta=fit steers a direction at its fitted norm, which "
                                          r"direction.method=layer_diff does not have"):
        context(tiny_lm, prompt_set, tmp_path, "eta=[0,fit]")
