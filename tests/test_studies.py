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
    assert sorted(table["method"].unique()) == ["histogram", "temperature"]
    assert len(table) == 2 * LAYERS
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
    ctx = context(tiny_lm, prompt_set, tmp_path, "eta=[0,3]", "metrics.bootstrap=60")
    result = get_study("steering").run(ctx)
    table = result.table
    zero = table[table["eta"] == 0.0]
    assert (zero[["delta_ece_lo", "delta_ece_hi"]].to_numpy() == 0).all()
    three = table[table["eta"] == 3.0].reset_index(drop=True)
    assert (three["delta_ece_lo"] <= three["delta_ece_hi"]).all()
    comparisons = result.summary["comparisons"]
    assert comparisons["cells_tested"] == LAYERS and comparisons["bonferroni_alpha"] == \
        pytest.approx(0.05 / LAYERS)
    assert comparisons["flagged_ece"] == int(three["significant_ece"].sum())
    final = result.summary["steering"]["3"]
    assert final["delta_ece_lo"] == pytest.approx(three["delta_ece_lo"].iloc[-1])
    assert isinstance(final["significant_ece"], bool)


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
