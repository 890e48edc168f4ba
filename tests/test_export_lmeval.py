"""``calibrate export lmeval``: the steering file lm-eval's ``steered`` model loads.

* the hookpoint table against the modules themselves: for every supported architecture (tiny
  random models), the name lm-eval resolves in ``model.base_model.named_modules()`` is the
  module the adapter steers (block ℓ - 1 for our layer ℓ);
* the real thing (slow, needs the ``test`` extra's lm-eval): a ``position=all`` steering job on
  SmolLM2-135M and lm-eval's ``--model steered`` with the exported file, on the same SST-2
  evaluation rows (a local task of those rows and options), give the same last-layer answers,
  so the same accuracy, and the same option probabilities (lm-eval's log-likelihoods,
  softmaxed over the options) to float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ARCHITECTURES, build_tiny, spec_of

from calibrate.core.direction import Direction
from calibrate.directions.files import read_direction as load_direction
from calibrate.directions.files import save_direction
from calibrate.directions.lmeval import (
    ExportError,
    ForcedExport,
    check_eta,
    export_job,
    hookpoint,
    steering_config,
)
from calibrate.model.adapters import get_adapter


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hookpoint_names_the_steered_block(arch):
    model = build_tiny(arch, 40)
    names = dict(model.base_model.named_modules())
    blocks = get_adapter(model).blocks
    for layer in range(1, len(blocks) + 1):
        assert names[hookpoint(arch, layer)] is blocks[layer - 1]
    with pytest.raises(ExportError, match="layer 0"):
        hookpoint(arch, 0)


IDENTITY = "0123456789abcdef"


def _fake_job(tmp_path: Path, position: str, eta_scale: str = "absolute",
              etas=(0.0, 2.0, 4.0)) -> Path:
    """A finished steering job's files: metrics.json and a direction that belongs to it."""
    vec = np.random.default_rng(0).standard_normal(8)
    meta = {"intervention_layers": [2, 3], "position": position, "eta_scale": eta_scale,
            "layer_scale": {"2": 10.0, "3": 20.0} if eta_scale == "residual_norm" else None,
            "config_hash": IDENTITY}
    save_direction(Direction(vec / np.linalg.norm(vec), meta), tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({
        "status": "complete", "study": "steering", "model_type": "gpt2", "config_hash": IDENTITY,
        "etas": list(etas), "intervention_layers": [2, 3]}))
    return tmp_path


def test_export_file_format(tmp_path):
    job = _fake_job(tmp_path, "all", "residual_norm")
    path = export_job(job, 4.0)
    loaded = torch.load(path, weights_only=False)
    assert sorted(loaded) == ["h.1", "h.2"]
    for name, scale in (("h.1", 10.0), ("h.2", 20.0)):
        entry = loaded[name]
        assert entry["action"] == "add" and entry["bias"] is None and entry["head_index"] is None
        assert entry["steering_coefficient"] == pytest.approx(4.0 * scale)
        assert float(entry["steering_vector"].norm()) == pytest.approx(1.0, abs=1e-6)
        assert entry["calibrate"] == {"job_dir": str(job), "config_hash": IDENTITY, "eta": 4.0,
                                      "forced": []}


def test_position_last_is_refused_unless_forced(tmp_path):
    job = _fake_job(tmp_path, "last")
    with pytest.raises(ExportError, match="position=all"):
        export_job(job, 2.0)
    with pytest.warns(ForcedExport, match="position='last'"):
        path = export_job(job, 2.0, tmp_path / "x.pt", force=True)
    assert torch.load(path, weights_only=False)["h.1"]["calibrate"]["forced"]


def test_cli(tmp_path, capsys):
    from calibrate.cli import main as calibrate_main
    from calibrate.directions.export_cli import main

    job = _fake_job(tmp_path, "all")
    assert main(["lmeval", str(job), "--eta", "2"]) == 0
    assert Path(capsys.readouterr().out.strip()).is_file()
    assert main(["lmeval", str(tmp_path / "nothing"), "--eta", "2"]) == 2
    capsys.readouterr()
    # the same through the calibrate command (``calibrate export ...``)
    assert calibrate_main(["export", "lmeval", str(job), "--eta", "4"]) == 0
    assert Path(capsys.readouterr().out.strip()).name == "lmeval_steer_eta4.pt"
    assert calibrate_main(["export", "lmeval", str(tmp_path / "nothing"), "--eta", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ")


@pytest.mark.parametrize("eta", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("force", [False, True])
def test_a_non_finite_eta_is_refused_even_forced(tmp_path, capsys, eta, force):
    from calibrate.directions.export_cli import main

    job = _fake_job(tmp_path, "all")
    before = sorted(p.name for p in job.iterdir())
    assert main(["lmeval", str(job), f"--eta={eta}", *(["--force"] if force else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"error: --eta {float(eta)}: not a finite number; accepted: one of the "
                    "job's η (0, 2, 4)")]
    assert sorted(p.name for p in job.iterdir()) == before  # nothing written


def test_an_eta_the_job_did_not_run_needs_force(tmp_path, capsys):
    from calibrate.directions.export_cli import main

    job = _fake_job(tmp_path, "all")
    assert main(["lmeval", str(job), "--eta", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--eta 3: the job did not run η = 3" in err[0]
    assert "accepted: one of its η (0, 2, 4), or --force" in err[0]
    assert not list(job.glob("*.pt"))
    assert main(["lmeval", str(job), "--eta", "3", "--force"]) == 0
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[0] == (
        "warning: forced export: η = 3 is not one of the job's η (0, 2, 4)")
    entry = torch.load(out.strip(), weights_only=False)["h.1"]
    assert entry["steering_coefficient"] == 3.0
    assert entry["calibrate"]["forced"] == ["η = 3 is not one of the job's η (0, 2, 4)"]
    assert check_eta(2.0000000000000004, [0.0, 2.0]) is None  # the same η, printed apart


def _stale_json(job: Path) -> None:
    meta = json.loads((job / "direction.json").read_text())
    (job / "direction.json").write_text(json.dumps({**meta, "config_hash": "another"}))


def _unmarked(job: Path) -> None:
    meta = json.loads((job / "direction.json").read_text())
    del meta["config_hash"]
    (job / "direction.json").write_text(json.dumps(meta))


def _stale_tensors(job: Path) -> None:
    direction = load_direction(job / "direction.safetensors")
    save_direction(Direction(direction.vector, {**direction.meta, "config_hash": "another"}),
                   job / "other")
    (job / "other" / "direction.safetensors").replace(job / "direction.safetensors")


def _no_metrics(job: Path) -> None:
    (job / "metrics.json").unlink()


def _incomplete(job: Path) -> None:
    metrics = json.loads((job / "metrics.json").read_text())
    (job / "metrics.json").write_text(json.dumps({**metrics, "status": "running"}))


def _probe_only(job: Path) -> None:
    metrics = json.loads((job / "metrics.json").read_text())
    (job / "metrics.json").write_text(json.dumps({**metrics, "study": "probe", "etas": None}))


@pytest.mark.parametrize("damage, says", [
    (_stale_json, ("direction.json does not belong to its metrics.json (config_hash 'another', "
                   f"metrics.json '{IDENTITY}')")),
    (_unmarked, "direction.json does not belong to its metrics.json (config_hash None"),
    (_stale_tensors, "direction.safetensors does not belong to its metrics.json"),
    (_no_metrics, "holds no finished result (metrics.json missing or not complete)"),
    (_incomplete, "holds no finished result"),
    (_probe_only, "is not a steering job (study 'probe')"),
])
@pytest.mark.parametrize("target", ["lmeval", "repeng"])
def test_only_a_finished_jobs_own_direction_is_exported(tmp_path, capsys, damage, says, target):
    from calibrate.directions.export_cli import main

    job = _fake_job(tmp_path, "all")
    damage(job)
    before = sorted(p.name for p in job.iterdir())
    assert main([target, str(job), *(["--eta", "2"] if target == "lmeval" else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {str(job)!r}") and says in err[0], err
    assert sorted(p.name for p in job.iterdir()) == before  # nothing written


def test_repeng_export_of_a_finished_job(tmp_path):
    from calibrate.directions.export_cli import export_repeng
    from calibrate.directions.gguf import read_control_vector

    job = _fake_job(tmp_path, "last")
    vector = read_control_vector(export_repeng(job))
    assert sorted(vector.directions) == [2, 3]
    np.testing.assert_allclose(vector.directions[2],
                               load_direction(job / "direction.safetensors").vector, atol=1e-6)


def test_a_real_steering_jobs_direction_carries_its_identity(tmp_path):
    """SmolLM2: direction.json and direction.safetensors carry metrics.json's config_hash, so
    the job exports; a rerun of another config into the folder makes the old files stale."""
    from calibrate import job as job_mod

    spec = spec_of("dataset.limit=8", "tracker=none", "probe.progress=false", "output.plots=false",
                   "metrics.bootstrap=0", "intervention=steering", "intervention.position=all",
                   "eta=[0,4]", "direction.n_random=0")
    job_dir = tmp_path / "job"
    summary = job_mod.run_job(spec, job_dir)
    meta = json.loads((job_dir / "direction.json").read_text())
    assert meta["config_hash"] == summary["config_hash"]
    assert load_direction(job_dir / "direction.safetensors").meta["config_hash"] == \
        summary["config_hash"]
    assert torch.load(export_job(job_dir, 4), weights_only=False)
    with pytest.raises(ExportError, match="the job did not run η = 8"):
        export_job(job_dir, 8)


def test_steering_config_absolute_units():
    d = Direction(np.eye(4)[0], {})
    cfg = steering_config(d, "llama", [1], 3.0)
    assert cfg["layers.0"]["steering_coefficient"] == 3.0


@pytest.mark.slow
def test_lmeval_steered_model_equals_a_position_all_job(tmp_path):
    """Our position=all steering job vs ``lm_eval --model steered`` on the same rows."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from calibrate import job as job_mod

    eta = 30.0
    spec = spec_of(
        "dataset.limit=16", "tracker=none", "probe.progress=false", "output.plots=false",
        "metrics.bootstrap=0", "model.dtype=float32", "intervention=steering",
        "intervention.position=all", "intervention.layers=[20]", f"eta=[0,{eta:g}]",
        "direction.n_random=0")
    job_dir = tmp_path / "job"
    job_mod.run_job(spec, job_dir)
    metrics = json.loads((job_dir / "metrics.json").read_text())
    steer_file = export_job(job_dir, eta)

    ctx = job_mod.prepare(spec)  # the model is reused from the job (same process)
    prompt_set = ctx.prompt_set
    eval_idx = ctx.split()[1]
    rows = tmp_path / "rows.jsonl"
    with rows.open("w") as handle:
        for i in eval_idx:
            handle.write(json.dumps({"prompt": prompt_set.prompts[i],
                                     "choices": list(prompt_set.option_strings),
                                     "label": int(prompt_set.labels[i])}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "calib_rows.yaml").write_text(
        "task: calib_rows\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {rows}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{prompt}}\"\n"
        "doc_to_choice: choices\ndoc_to_target: label\ntarget_delimiter: \"\"\n"
        "metric_list:\n  - metric: acc\n")
    out = simple_evaluate(
        model="steered",
        model_args={"pretrained": metrics["model_identity"]["source"],
                    "steer_path": str(steer_file), "dtype": "float32", "device": "cpu"},
        tasks=["calib_rows"], task_manager=TaskManager(include_path=str(tasks)),
        batch_size=1, log_samples=True)
    lm_acc = out["results"]["calib_rows"]["acc,none"]
    samples = sorted(out["samples"]["calib_rows"], key=lambda s: s["doc_id"])
    lm_ll = np.array([[r[0] for r in s["filtered_resps"]] for s in samples], dtype=np.float64)
    lm_probs = np.exp(lm_ll - lm_ll.max(1, keepdims=True))
    lm_probs /= lm_probs.sum(1, keepdims=True)

    import pandas as pd

    table = pd.read_csv(job_dir / "steering.csv")
    last = table[(table["eta"] == eta) & (table["layer"] == table["layer"].max())].iloc[0]
    assert lm_acc == pytest.approx(last["accuracy"], abs=1e-12)
    # per example: the steered last-layer probabilities of the job, recomputed through the engine
    from calibrate.core.option_scores import option_probabilities
    from calibrate.directions.files import load_direction
    from calibrate.engine.edits import Steering

    hidden = ctx.loaded.adapter.unembed_weight.shape[1]
    direction = load_direction(job_dir / "direction.safetensors", hidden)
    steering = Steering(direction.vector, (20,), (eta,), "all")
    ours = option_probabilities(ctx.steered(prompt_set.subset(eval_idx), steering))[0, :, -1]
    np.testing.assert_allclose(ours, lm_probs, atol=2e-4)
    assert (ours.argmax(1) == lm_probs.argmax(1)).all()
    unsteered = table[(table["eta"] == 0) & (table["layer"] == table["layer"].max())].iloc[0]
    assert last["changed"] > 0 or abs(last["ece"] - unsteered["ece"]) > 1e-3  # eta does something


def test_export_prints_the_lm_eval_command(tmp_path, capsys):
    """The command names the model as the job loaded it, the steering file and the task."""
    import shlex

    from calibrate.directions.export_cli import main

    job = _fake_job(tmp_path, "all")
    metrics = json.loads((job / "metrics.json").read_text())
    (job / "metrics.json").write_text(json.dumps({**metrics, "dataset": "arc_easy",
                                                  "model_source": "/models/smol lm"}))
    assert main(["lmeval", str(job), "--eta", "2"]) == 0
    out, err = capsys.readouterr()
    command = err.strip().splitlines()[-1].strip()
    words = shlex.split(command)
    assert words[:3] == ["lm_eval", "--model", "steered"]
    assert words[4] == f"pretrained=/models/smol lm,steer_path={Path(out.strip()).absolute()}"
    assert words[words.index("--tasks") + 1] == "arc_easy"
