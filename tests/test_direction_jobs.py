"""pca, probe and gradient directions, and a repeng GGUF as ``direction.path``, in real steering
jobs on SmolLM2-135M (16 SST-2 sentences: 8 calibration, 8 evaluation), each direction
recomputed here from the cached residuals with an independent reference (sklearn)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import spec_of

from calibrate import job as job_mod
from calibrate.directions.files import load_direction, read_direction

pytestmark = pytest.mark.slow
sklearn = pytest.importorskip("sklearn")

BASE = ["dataset.limit=16", "tracker=none", "probe.progress=false", "output.plots=true",
        "metrics.bootstrap=0", "model.dtype=float32", "probe.min_fill=0",
        "intervention=steering", "eta=[0,4]", "direction.n_random=0"]


def spec(*overrides: str):
    return spec_of(*BASE, *overrides)


def run(tmp: Path, *overrides: str) -> tuple[Path, dict]:
    job_dir = tmp / "job"
    job_spec = spec(*overrides)
    job_mod.run_job(job_spec, job_dir)
    meta = json.loads((job_dir / "direction.json").read_text())
    assert meta["config_hash"] == job_spec.identity  # the direction names the job it came from
    return job_dir, meta


def cached(*overrides: str, keep=(27, 28, 29, 30), n=16):
    ctx = job_mod.prepare(spec(*overrides))
    probe = ctx.probe(keep=list(keep))
    cal = np.sort(np.random.default_rng(0).permutation(n)[:n // 2])  # seed 0, fraction 0.5
    return ctx, probe, cal


def test_pca_job(tmp_path):
    from sklearn.decomposition import PCA

    job_dir, meta = run(tmp_path, "direction.method=pca")
    _, probe, cal = cached("direction.method=pca")
    diffs = []
    for layer in (28, 29, 30):
        d = probe.residuals[layer][cal].astype(np.float64) - probe.residuals[layer - 1][cal]
        diffs.append(d / np.linalg.norm(d, axis=1, keepdims=True))
    diffs = np.concatenate(diffs)
    ref = PCA(n_components=1).fit(diffs).components_[0]
    ref *= np.sign(diffs.mean(0) @ ref)
    np.testing.assert_allclose(read_direction(job_dir / "direction.safetensors").vector, ref,
                               atol=1e-8)
    loaded = load_direction(job_dir / "direction.safetensors", 576)  # checked, normalised
    np.testing.assert_allclose(loaded.vector, ref, atol=1e-8)
    assert loaded.meta["loaded_norm"] == pytest.approx(1.0)
    mean = diffs.reshape(3, 8, -1).mean(1).mean(0)
    assert meta["cosine_layer_diff"] == pytest.approx(ref @ mean / np.linalg.norm(mean), abs=1e-8)
    assert 0 <= meta["null_space_rho"] <= 1 and meta["method"] == "pca"


def test_probe_job(tmp_path):
    from sklearn.linear_model import LogisticRegression

    args = ("direction.method=probe", "direction.probe.layer=20", "dataset.limit=64")
    job_dir, meta = run(tmp_path, *args)
    _, probe, cal = cached(*args, keep=(20, 27, 28, 29, 30), n=64)
    correct = probe.probs[cal, -1].argmax(-1) == probe.labels[cal]
    assert 0 < correct.sum() < len(correct)  # SmolLM2 gets some of the 32 wrong
    w = LogisticRegression(C=1.0, tol=1e-12, max_iter=100_000).fit(
        probe.residuals[20][cal].astype(np.float64), correct).coef_[0]
    got = read_direction(job_dir / "direction.safetensors").vector
    assert got @ (-w / np.linalg.norm(w)) == pytest.approx(1.0, abs=1e-6)
    assert meta["layers"] == [20]


def test_gradient_job_last_layer(tmp_path):
    job_dir, meta = run(tmp_path, "direction.method=gradient", "direction.gradient.max_steps=30")
    curve = pd.read_csv(job_dir / "gradient_fit.csv")
    assert (job_dir / "gradient_fit.png").is_file()
    assert list(curve.columns) == ["step", "train_loss", "train_objective", "holdout_loss",
                                   "holdout_objective", "norm"]
    assert meta["fit_layer"] == 30 and meta["method"] == "gradient"
    assert meta["loss_best"] <= meta["loss_start"]
    assert meta["loss_curve"]["step"] == curve["step"].tolist()
    # deterministic: the same job again gives the same vector
    again, _ = run(tmp_path / "again", "direction.method=gradient",
                   "direction.gradient.max_steps=30")
    np.testing.assert_array_equal(read_direction(job_dir / "direction.safetensors").vector,
                                  read_direction(again / "direction.safetensors").vector)


def test_gradient_job_fourth_last_block(tmp_path):
    job_dir, meta = run(tmp_path, "direction.method=gradient", "intervention.layers=[26]",
                        "direction.gradient.max_steps=10", "direction.gradient.objective=brier",
                        "direction.gradient.accuracy_penalty=1.0")
    assert meta["fit_layer"] == 26 and meta["steps_run"] <= 10
    table = pd.read_csv(job_dir / "steering.csv")
    assert set(table["eta"]) == {0, 4}


def test_gguf_control_vector_as_direction_path(tmp_path):
    """A repeng GGUF of the pca job's vector at block 29 (our layer 30) steers like the pca job."""
    import gguf

    job_dir, _ = run(tmp_path / "pca", "direction.method=pca")
    vec = read_direction(job_dir / "direction.safetensors").vector
    path = tmp_path / "cv.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")  # repeng's export_gguf layout
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 2)
    writer.add_tensor("direction.28", np.zeros(576, np.float32) + 1)
    writer.add_tensor("direction.29", (vec * 3).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    loaded_dir, meta = run(tmp_path / "gguf", f"direction.path={path}")
    assert meta["method"] == "repeng_gguf" and meta["layers"] == [30]
    ours = pd.read_csv(job_dir / "steering.csv")
    theirs = pd.read_csv(loaded_dir / "steering.csv")
    np.testing.assert_allclose(theirs["ece"], ours["ece"], atol=1e-5)
    assert (theirs["accuracy"] == ours["accuracy"]).all()


def test_a_direction_fit_in_another_prompt_style_uses_the_jobs_own_calibration_records():
    """ĉ fit 2-shot and applied zero-shot equals the ĉ of a 2-shot job on the same records (the
    exemplars come from rows neither evaluates), while the evaluation stays zero-shot."""
    import calibrate

    common = [*BASE, "dataset.shuffle=true", "dataset.limit=24"]
    two_shot = calibrate.run_study([*common, "prompt.shots=2"])
    transfer = calibrate.run_study([*common, "direction.source_prompt={shots:2}"])
    zero_shot = calibrate.run_study(common)
    np.testing.assert_allclose(transfer.direction.vector, two_shot.direction.vector, atol=1e-6)
    assert not np.allclose(transfer.direction.vector, zero_shot.direction.vector, atol=1e-3)
    assert transfer.direction.meta["fit_prompt"] == {"shots": 2, "chat_template": False}
    assert transfer.direction.meta["prompt_transfer"] is True
    assert two_shot.direction.meta["prompt_transfer"] is False
    assert transfer.report.final == pytest.approx(zero_shot.report.final)
    assert transfer.summary["direction"]["prompt_transfer"] is True


def test_a_prompt_style_fit_that_could_read_evaluation_rows_is_refused():
    """Without rows left over, 2-shot exemplars come out of the evaluated rows: the records of
    the two styles differ and the fit is refused before any forward pass."""
    import calibrate
    from calibrate.core.direction import DirectionError

    with pytest.raises(DirectionError, match=r"direction.source_prompt=\{'shots': 2\}.*"
                                             r"set dataset.limit below the split's size"):
        calibrate.run_study([*BASE, "dataset.limit=null", "direction.source_prompt={shots:2}"])
