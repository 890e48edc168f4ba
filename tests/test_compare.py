"""calibrate.io.compare (``calibrate compare``) on real job directories: jobs run in-process through ``run_job`` on tiny
random models (only the model loading is replaced), failures recorded as a multirun records them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from cli_support import cli_env
from omegaconf import OmegaConf
from references import (
    HOSTILE,
    HOSTILE_ERROR,
    HOSTILE_MODEL,
    assert_no_markup_from,
    assert_shown_as_given,
    hostile_sweep,
    md_to_html,
    parse_html,
)

from calibrate import job as job_mod
from calibrate.io import compare as cmp
from calibrate.io import results
from calibrate.io.summary import SUMMARY_FILE, summarize_sweep
from calibrate.studies.job_context import JobContext

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SENTENCES = ["the movie was great", "a very boring film", "this film is not good , it was bad",
             "fun", "the the the movie was very very fun and good good", "bad", "it was terrible",
             "a great fun movie", "not bad", "very very boring", "good", "the film is fun",
             "this is not a good movie", "great", "it was not fun", "a terrible terrible film"]


def job_cfg(overrides: list[str]):
    """The composed job config exactly as ``calibrate.run``'s Hydra entry point receives it."""
    from calibrate.api import compose

    return compose(overrides)


def tiny_model(tokenizer, blocks: int, name: str):
    import torch
    from conftest import TINY_SIZES
    from transformers import AutoConfig, AutoModelForCausalLM

    from calibrate.model.load import wrap_model

    torch.manual_seed(blocks)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2,
                                  **{**TINY_SIZES, "num_hidden_layers": blocks})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return wrap_model(model, tokenizer, name=name)


def run_one(job_dir: Path, overrides: list[str], loaded, cache: Path) -> None:
    """One job as the Hydra entry point runs it: .hydra/ files, run_job, error.json on failure.

    Only the model loading is replaced (the tiny model); everything else is the real job."""
    from calibrate.config.spec import build_spec
    from calibrate.run import _fail
    from calibrate.tasks.prompts import build_prompts

    overrides = [f"model.name={loaded.name}", "tracker=none", *overrides, f"cache_dir={cache}",
                 "probe.progress=false", "output.plots=false", "output.predictions=false",
                 "++metrics.bootstrap=0"]
    cfg = job_cfg(overrides)
    hydra = job_dir / ".hydra"
    hydra.mkdir(parents=True)
    OmegaConf.save(cfg, hydra / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), hydra / "overrides.yaml")  # Hydra's format: a list
    records = [SimpleNamespace(question=s, options=("bad", "good"), label=i % 2, subject="")
               for i, s in enumerate(SENTENCES)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(job_mod, "prepare", lambda spec: JobContext(
            spec, loaded, build_prompts(records, spec.dataset, loaded.tokenizer)))
        try:
            job_mod.run_job(build_spec(cfg), job_dir, name=job_dir.name)
        except Exception as err:  # noqa: BLE001 - a failing job in a sweep is recorded
            _fail(job_dir, err, multirun=True, user_error=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, word_tokenizer) -> SimpleNamespace:
    """Two sweeps and one single job:

    * ``steer``: 2 steering jobs differing in direction.layers (1-2, 2-3), plus one failing job
      (direction.layers=[9] on a 4-layer model);
    * ``probe``: two probe jobs on models of 3 and 5 blocks, each with a nullspace.json;
    * ``single``: one steering job with the random direction control.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add contention (10x slower on 2 cores)
    try:
        return build_runs(tmp_path_factory.mktemp("runs"), word_tokenizer)
    finally:
        torch.set_num_threads(threads)


def build_runs(root: Path, word_tokenizer) -> SimpleNamespace:
    cache = root / "cache"
    small = tiny_model(word_tokenizer, 3, "tiny3")
    deep = tiny_model(word_tokenizer, 5, "tiny5")
    steer = root / "multirun" / "steer"
    plan = [["eta=[0,2,4]", "direction.layers=[1,2]"], ["eta=[0,2,4]", "direction.layers=[2,3]"],
            ["eta=[0,4]", "direction.layers=[9]"]]
    for num, overrides in enumerate(plan):
        run_one(steer / str(num), overrides, small, cache)
    summarize_sweep(steer)
    probe = root / "multirun" / "probe"
    for num, loaded in enumerate([small, deep]):
        run_one(probe / str(num), [], loaded, cache)
    summarize_sweep(probe)
    # nullspace.json in two layouts (the producer is not written yet: both must be understood)
    results.write_json(probe / "0" / "nullspace.json", {
        "k": 3, "rho": 0.4, "rho_random_mean": 0.1, "p_value": 0.01, "max_cosine": 0.3,
        "truncation": {"delta_ece": -0.02, "delta_mce": -0.05},
        "random_control": [{"delta_ece": 0.001, "delta_mce": 0.002},
                           {"delta_ece": -0.003, "delta_mce": 0.0}]})
    results.write_json(probe / "1" / "nullspace.json", {
        "k": 5, "rho": 0.2, "p_value": 0.3, "delta_ece": 0.01, "delta_mce": 0.03,
        "random_delta_ece": 0.005, "random_delta_mce": 0.01})
    single = root / "outputs" / "12-00-00_tiny3_sst2"
    run_one(single, ["eta=[0,4]", "direction.method=random", "direction.layers=[1,2]"], small,
            cache)
    return SimpleNamespace(root=root, steer=steer, probe=probe, single=single)


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def compared(runs, tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("cmp") / "compare"
    code = cmp.main([str(runs.steer), str(runs.probe), str(runs.single), "--out", str(out),
                     "--relative-depth"])
    assert code == 0
    return SimpleNamespace(out=out, table=pd.read_csv(out / "runs.csv"))


def test_inputs_are_real_jobs(runs):
    steer = pd.read_csv(runs.steer / SUMMARY_FILE)  # one row per job and eta
    assert steer["status"].tolist() == ["complete"] * 4 + ["failed"]
    assert steer["eta"].tolist()[:4] == [2.0, 4.0, 2.0, 4.0]
    assert (runs.steer / "0" / "steering.csv").is_file()
    assert not (runs.probe / "0" / "steering.csv").exists()
    assert (runs.single / results.METRICS_FILE).is_file()


def test_runs_table_has_every_job_with_its_final_metrics(runs, compared):
    table = compared.table
    assert len(table) == 6
    assert list(table.columns[:7]) == ["sweep", "job", "label", "overrides", "status", "model",
                                      "dataset"]
    for _, row in table.iterrows():
        metrics = results.read_metrics(Path(row["path"]))
        if row["status"] != "complete":
            continue
        assert row["model"] == metrics["model"] and row["n_examples"] == metrics["n_examples"]
        for key, value in metrics["final"].items():
            assert row[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
        for key in ("plateau_layer", "peak_ece_layer", "peak_ece"):
            if metrics[key] is None:
                assert pd.isna(row[key])
            else:
                assert row[key] == pytest.approx(metrics[key])
    failed = table[table["status"] == "failed"]
    assert len(failed) == 1 and "direction.layers=[9]" in failed.iloc[0]["overrides"]
    assert "DirectionError" in failed.iloc[0]["error"]
    assert table["label"].is_unique


def test_labels_are_the_differing_overrides(compared):
    labels = sorted(compared.table["label"])
    assert labels == ["model.name=tiny3", "model.name=tiny3 eta=[0,2,4] direction.layers=[1,2]",
                      "model.name=tiny3 eta=[0,2,4] direction.layers=[2,3]",
                      "model.name=tiny3 eta=[0,4] direction.layers=[9]",
                      "model.name=tiny3 eta=[0,4] direction.method=random direction.layers=[1,2]",
                      "model.name=tiny5"]
    runs = [cmp.Run("s", Path(str(i)), ["tracker=none", f"eta={e}"], {"model": "m", "dataset": "d"},
                    {"status": "complete"}) for i, e in enumerate((0, 4))]
    cmp.assign_labels(runs)
    assert [r.label for r in runs] == ["eta=0", "eta=4"]
    same = [cmp.Run("s", Path(str(i)), [], {"model": "m", "dataset": "d"}, {}) for i in range(2)]
    cmp.assign_labels(same)
    assert [r.label for r in same] == ["m/d (s/0)", "m/d (s/1)"]


def test_layer_lines_never_label_an_unsteered_curve_with_an_eta(runs):
    """A steering job's layers.csv is unsteered: labelled so, without η or its steering
    overrides, and drawn once for the jobs that share it (one model × dataset panel)."""
    found = cmp.load_runs([runs.steer])
    panels = cmp.layer_lines(found, "ece")
    ((panel, curves),) = panels.items()
    assert panel.startswith("tiny3 / ")
    assert len(curves) == 1 and curves[0].label == "steering (unsteered)"
    table = pd.read_csv(runs.steer / "0" / "layers.csv")
    np.testing.assert_allclose(curves[0].y, table["ece"])


def test_markdown_is_a_headline_then_details_within_120_columns(compared):
    text = (compared.out / "runs.md").read_text()
    assert all(len(line) <= 120 for line in text.splitlines())
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Headline" and "## Runs" in headings and "## Failed runs" in headings
    head = text.split("## Headline")[1].split("## ")[0]
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            for line in head.splitlines() if line.startswith("|")]
    assert rows[0][:2] == ["#", "run"] and len(rows[0]) <= 10
    assert len(rows) == 2 + 5  # the complete runs; the failed one is in its own table
    failed = text.split("## Failed runs")[1]
    assert "direction.layers=[9]" in failed and "DirectionError" in failed


def test_markdown_fallback_without_tabulate(monkeypatch):
    monkeypatch.setitem(sys.modules, "tabulate", None)  # import fails
    text = cmp.markdown_table(pd.DataFrame({"a": [1.0, np.nan], "b": ["x|y", None]}))
    assert text.splitlines() == ["| a | b |", "| --- | --- |", "| 1.0000 | x\\|y |", "|  |  |"]


def test_markdown_with_tabulate():
    pytest.importorskip("tabulate")
    text = cmp.markdown_table(pd.DataFrame({"a": [1.0, np.nan], "n": pd.array([8, None], "Int64"),
                                            "b": ["x|y", None]}))
    lines = text.splitlines()
    assert len(lines) == 4 and "x\\|y" in lines[2] and "nan" not in text and "<NA>" not in text


@pytest.mark.parametrize("text, markdown", [
    ("arc_easy gemma3_270m", "arc_easy gemma3_270m"),  # between letters _ opens nothing
    ("_em_ __init__", "\\_em\\_ \\_\\_init\\_\\_"),
    ("a|b", "a\\|b"),
    ("<b>&amp;</b>", "&lt;b&gt;&amp;amp;&lt;/b&gt;"),
    ("[x](javascript:y) [r][1] [9]", "[x\\](javascript:y) [r\\][1] [9]"),
    ("`c` *s* ~t~ $m$ \\", "\\`c\\` \\*s\\* \\~t\\~ \\$m\\$ \\\\"),
    ("a\nb\rc\td\u2028e", "a b c d e"),
])
def test_md_text_escapes_what_would_be_markup(text, markdown):
    from calibrate.io.compare.tables import md_text

    assert md_text(text) == markdown


def test_md_wrap_escapes_block_markup_at_line_starts():
    from calibrate.io.compare.tables import md_wrap

    assert md_wrap("# a - b + c = d [e] 1. f 2) g 3.5", 5).splitlines() == [
        "\\# a", "\\- b", "\\+ c", "\\= d", "\\[e]", "1\\. f", "2\\) g", "3.5"]


def test_user_text_is_never_markup_in_runs_md(tmp_path):
    """Hostile run name, model name, error message and folder name: runs.md shows them as
    text (markdown-it finds no HTML, link, code, emphasis or heading in it)."""
    sweep = hostile_sweep(tmp_path)
    assert cmp.main([str(sweep), "--out", str(tmp_path / "out"), "--metric", "ece"]) == 0
    md = (tmp_path / "out" / "runs.md").read_text()
    assert all(len(line) <= 120 for line in md.splitlines())
    page = parse_html(md_to_html(md))
    assert_no_markup_from(page, h1=1)
    for given in (HOSTILE, HOSTILE_MODEL, HOSTILE_ERROR):
        assert_shown_as_given(page.cells, given)
    assert str(sweep) in page.text.replace("\n", " ")


def test_unreadable_error_json_is_a_row(runs, tmp_path):
    job = tmp_path / "broken"
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(["eta=4"]), job / ".hydra" / "overrides.yaml")
    (job / results.ERROR_FILE).write_text("{not json")
    table = cmp.compare([job, runs.probe / "1"], tmp_path / "out", metrics=["ece"])
    assert table["status"].tolist() == ["unreadable", "complete"]
    assert table.loc[0, "overrides"] == "eta=4"


def test_layer_plots(compared):
    for metric in ("accuracy", "ece", "mce"):
        assert is_png(compared.out / f"layers_{metric}.png")
    assert not list(compared.out.glob(".*.tmp"))


def test_steering_outputs(runs, compared):
    steering = pd.read_csv(compared.out / "steering.csv")
    # 3 + 3 final-layer rows from the sweep, 2 from the single job; the failed job has none
    assert len(steering) == 8
    assert {"overrides", "eta", "ece", "accuracy", "delta_ece", "direction_layers"} <= set(steering)
    for _, row in steering.iterrows():
        metrics = json.loads((Path(runs.root) / _job_path(runs, row) / "metrics.json").read_text())
        ref = metrics["steering"][f"{row['eta']:g}"]
        assert row["ece"] == pytest.approx(ref["ece"], abs=1e-12)
        assert row["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert set(steering["direction_layers"]) == {"1-2", "2-3", "none"}  # none: random
    for metric in ("accuracy", "ece", "mce"):
        assert is_png(compared.out / f"eta_{metric}.png")
        assert is_png(compared.out / f"ablation_{metric}.png")


def _job_path(runs, row) -> Path:
    if not isinstance(row["sweep"], str) or not row["sweep"]:
        return runs.single.relative_to(runs.root)
    return (Path(row["sweep"]) / str(row["job"])).relative_to(runs.root)


def test_nullspace_outputs(compared):
    table = pd.read_csv(compared.out / "nullspace.csv")
    assert len(table) == 2
    first, second = table.iloc[0], table.iloc[1]
    assert first["delta_ece"] == pytest.approx(-0.02) and first["delta_mce"] == pytest.approx(-0.05)
    assert first["random_delta_ece"] == pytest.approx(-0.001)
    assert first["random_delta_ece_std"] == pytest.approx(0.002)
    assert second["random_delta_mce"] == pytest.approx(0.01) and second["k"] == 5
    assert is_png(compared.out / "nullspace_truncation.png")


def test_nullspace_fields_layouts():
    f = cmp.nullspace_fields
    found = f({"delta_ece": 0.1, "random_control": {"delta_ece": [0.0, 0.2]}})
    assert found["random_delta_ece"] == pytest.approx(0.1)
    assert found["random_delta_ece_std"] == pytest.approx(0.1)
    nested = {"truncation": {"delta_mce": 0.3, "random_delta_mce": {"mean": 0.1, "std": 0.05}}}
    assert f(nested) == {"delta_mce": 0.3, "random_delta_mce": 0.1, "random_delta_mce_std": 0.05}
    plain = {"k": 2, "rho": 0.5, "note": "x", "nested": {"a": 1}}
    assert f(plain) == {"k": 2, "rho": 0.5, "note": "x"}


def test_probe_only_sweep_has_no_steering_outputs(runs, tmp_path, capsys):
    table = cmp.compare([runs.probe], tmp_path / "out", metrics=["ece"])
    assert len(table) == 2 and table["status"].eq("complete").all()
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"runs.csv", "runs.md", "layers_ece.png", "nullspace.csv",
                     "nullspace_truncation.png"}
    # tiny3 and tiny5 are different models: separate panels, each in its own layer numbering
    assert "different depths" not in capsys.readouterr().err
    assert table.attrs["outputs"]


def test_single_job_dir_and_metric_choice(runs, tmp_path):
    table = cmp.compare([runs.steer / "1"], tmp_path / "out", metrics=["nll"])
    assert len(table) == 1 and table.loc[0, "label"] == table.loc[0, "overrides"]  # all of them
    assert is_png(tmp_path / "out" / "layers_nll.png")
    assert not (tmp_path / "out" / "eta_ece.png").exists()  # only the chosen metrics
    assert is_png(tmp_path / "out" / "eta_nll.png")
    assert (tmp_path / "out" / "steering.csv").is_file()
    assert not (tmp_path / "out" / "ablation_nll.png").exists()  # one layer range: no ablation


@pytest.mark.parametrize("kind", ["empty", "missing", "file", "nested"])
def test_bad_input_exits_2_and_writes_nothing(runs, tmp_path, capsys, kind):
    bad = tmp_path / "bad"
    if kind == "empty":
        bad.mkdir()
    elif kind == "file":
        bad.write_text("x")
    elif kind == "nested":
        (bad / "sub" / "deeper").mkdir(parents=True)
    out = tmp_path / "out"
    assert cmp.main([str(runs.probe), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "accepted" in err[0]
    assert not out.exists()


def test_cli_subprocess_bad_dir(tmp_path):
    bad = tmp_path / "not_a_sweep"
    bad.mkdir()
    proc = subprocess.run([sys.executable, "-m", "calibrate", "compare", str(bad), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path,
                          env=cli_env())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"error: {bad}: neither a sweep nor a job directory (no job folders with .hydra/, no "
        f"metrics.json); accepted: {cmp.ACCEPTED}")
    assert not (tmp_path / "o").exists()


def test_cli_default_out_is_printed(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cmp.main([str(runs.probe), "--metric", "ece"]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "compare") in printed and "layers_ece.png" in printed
    assert (tmp_path / "compare" / "runs.csv").is_file()
    assert is_png(tmp_path / "compare" / "layers_ece.png")
    assert not (tmp_path / "compare" / "layers_mce.png").exists()


def test_wandb_group_offline_fails_clearly(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "out"
    args = [str(runs.probe), "--wandb-group", "me/calibrate/sweep1", "--out", str(out)]
    assert cmp.main(args) == 2
    err = capsys.readouterr().err
    assert "--wandb-group=me/calibrate/sweep1" in err and "offline" in err
    assert not out.exists()
    assert cmp.main([str(runs.probe), "--wandb-group", "nogroup", "--out", str(out)]) == 2
    assert "ENTITY/PROJECT/GROUP" in capsys.readouterr().err


def test_wandb_group_rows(runs, tmp_path, monkeypatch):
    """The W&B rows join the table (wandb.Api replaced: no network in tests)."""
    fake = SimpleNamespace(name="tiny3-toy-eta=4", state="finished", url="https://wandb.ai/x",
                           config={"model": {"name": "tiny3"}, "dataset": {"name": "toy"}},
                           summary={"final/ece": 0.25, "final/accuracy": 0.5, "n_examples": 8,
                                    "plateau_layer": 2})

    class Api:
        def __init__(self, **_kw):
            pass

        def runs(self, path, filters):
            assert path == "me/calibrate" and filters == {"group": "g"}
            return [fake]

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(Api=Api))
    table = cmp.compare([runs.probe], tmp_path / "out", metrics=["ece"],
                        wandb_group="me/calibrate/g")
    assert len(table) == 3
    row = table[table["sweep"] == "wandb:me/calibrate/g"].iloc[0]
    assert row["ece"] == 0.25 and row["status"] == "complete" and row["model"] == "tiny3"
