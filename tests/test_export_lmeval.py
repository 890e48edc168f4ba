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
from calibrate.directions.files import save_direction
from calibrate.directions.lmeval import ExportError, export_job, hookpoint, steering_config
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


def _fake_job(tmp_path: Path, position: str, eta_scale: str = "absolute") -> Path:
    vec = np.random.default_rng(0).standard_normal(8)
    meta = {"intervention_layers": [2, 3], "position": position, "eta_scale": eta_scale,
            "layer_scale": {"2": 10.0, "3": 20.0} if eta_scale == "residual_norm" else None}
    save_direction(Direction(vec / np.linalg.norm(vec), meta), tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"model_type": "gpt2",
                                                       "intervention_layers": [2, 3]}))
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


def test_position_last_is_refused_unless_forced(tmp_path):
    job = _fake_job(tmp_path, "last")
    with pytest.raises(ExportError, match="position=all"):
        export_job(job, 1.0)
    assert export_job(job, 1.0, tmp_path / "x.pt", force=True).is_file()


def test_cli(tmp_path, capsys):
    from calibrate.cli import main as calibrate_main
    from calibrate.directions.export_cli import main

    job = _fake_job(tmp_path, "all")
    assert main(["lmeval", str(job), "--eta", "2"]) == 0
    assert Path(capsys.readouterr().out.strip()).is_file()
    assert main(["lmeval", str(tmp_path / "nothing"), "--eta", "2"]) == 2
    capsys.readouterr()
    # the same through the calibrate command (``calibrate export ...``)
    assert calibrate_main(["export", "lmeval", str(job), "--eta", "3"]) == 0
    assert Path(capsys.readouterr().out.strip()).name == "lmeval_steer_eta3.pt"
    assert calibrate_main(["export", "lmeval", str(tmp_path / "nothing"), "--eta", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ")


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
