"""Steering and ablation jobs end to end on the real SmolLM2-135M, in process.

Each job runs ``calibrate.job.run_job`` on 16 SST-2 sentences (8 calibration, 8 evaluation)
with the tracker and plots off. The unsteered probe goes through the probe cache in the real
user cache, so after the first job (or the first session) only the steering passes cost time.

Checks against references computed here: c_hat recomputed by hand from the cached residuals
and the seeded split, the null space from numpy's own eigendecomposition of W_Uᵀ W_U, eta 0
against the plain probe (layers.csv), loaded directions against the fitted one.

Numerics (float32 forced, so a GPU machine runs the same arithmetic as a CPU one): eta 0 of
the key/value path and the plain forward of the probe agree to float rounding, ~1e-6 in each
example's confidence, and ECE/MCE move by at most that much. The key/value path also runs every
eta (variant) of an example as another row of one batch, and CPU matmul kernels need not round
identical rows identically at every row position (seen: ~1e-5 in the logits with a 3-batch
plan, 0 with one batch). ECE/MCE comparisons therefore use METRIC_TOL = 1e-5; predictions
(accuracy, ``changed``) are compared exactly, which holds as long as no example sits on a
near-tie of its two options (none of these 8 does).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import spec_of
from omegaconf import OmegaConf

from calibrate import job as job_mod
from calibrate.core.direction import Direction, DirectionError
from calibrate.directions.files import load_direction, read_direction, save_direction
from calibrate.errors import ConfigError
from calibrate.model import load as models

pytestmark = pytest.mark.slow

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BASE = ["dataset.limit=16", "tracker=none", "probe.progress=false", "output.plots=false",
        "metrics.bootstrap=0", "model.dtype=float32",
        "probe.min_fill=0"]  # one batch of 8 per steering pass: fewer, larger matmuls on CPU
LAYERS = 31  # SmolLM2-135M: embeddings + 30 blocks
HIDDEN = 576
METRIC_TOL = 1e-5  # see the module docstring
STEERING_COLUMNS = ["eta", "layer", "accuracy", "ece", "mce", "delta_accuracy", "delta_ece",
                    "delta_mce", "changed"]
RESULT_NAMES = ("layers.csv", "metrics.json", "predictions.npz", "steering.csv", "ablation.csv",
                "nullspace.json", "direction.safetensors", "direction.json")


def config(*overrides: str):
    """The job spec of ``BASE`` + ``overrides`` (every group typed and checked)."""
    return spec_of(*BASE, *overrides)


def run(tmp: Path, *overrides: str) -> tuple[Path, dict]:
    job_dir = tmp / "job"
    return job_dir, job_mod.run_job(config(*overrides), job_dir)


def steering(job_dir: Path) -> pd.DataFrame:
    return pd.read_csv(job_dir / "steering.csv")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def eta_rows(table: pd.DataFrame, eta: float) -> pd.DataFrame:
    rows = table[table["eta"] == eta].sort_values("layer").reset_index(drop=True)
    assert list(rows["layer"]) == list(range(LAYERS))
    return rows


def assert_same_results(a: pd.DataFrame, b: pd.DataFrame, columns=None) -> None:
    """Two jobs' tables: predictions (accuracy, changed) exactly, the rest to METRIC_TOL.

    Jobs that keep other residual layers read their unsteered probe from other cache entries
    (the key leaves batching out), and the probe of a batch plan rounds within float32 rounding
    of another (module docstring); the steering table's layers below a last-layer edit are that
    probe's."""
    a, b = (t if columns is None else t[columns] for t in (a, b))
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    exact = [c for c in a.columns if c in ("eta", "layer", "accuracy", "delta_accuracy", "changed")]
    pd.testing.assert_frame_equal(a[exact], b[exact], check_exact=True)
    pd.testing.assert_frame_equal(a.drop(columns=exact), b.drop(columns=exact), check_exact=False,
                                  rtol=0, atol=METRIC_TOL)


def assert_no_results(job_dir: Path) -> None:
    present = sorted(p.name for p in job_dir.iterdir()) if job_dir.exists() else []
    assert not [n for n in present if n in RESULT_NAMES or n.endswith(".png")], present


# ---------------------------------------------------------------- the steering job


@pytest.fixture(scope="module")
def steered(tmp_path_factory):
    """intervention=steering, eta=[0,2,8]: the reference every other job is compared with."""
    job_dir, summary = run(tmp_path_factory.mktemp("steer"), "intervention=steering",
                           "eta=[0,2,8]")
    loaded = next(iter(models._LOADED.values()))
    return job_dir, summary, loaded


def test_steering_table_shape_and_reference_rows(steered):
    job_dir, _, _ = steered
    table = steering(job_dir)
    assert set(STEERING_COLUMNS) <= set(table.columns)
    assert len(table) == 3 * LAYERS
    assert sorted(table["eta"].unique()) == [0.0, 2.0, 8.0]
    zero = eta_rows(table, 0.0)
    for column in ("delta_accuracy", "delta_ece", "delta_mce", "changed"):
        assert (zero[column] == 0).all(), column


def test_eta_zero_equals_the_unsteered_probe(steered):
    job_dir, _, _ = steered
    zero = eta_rows(steering(job_dir), 0.0)
    layers = pd.read_csv(job_dir / "layers.csv")  # the plain forward on the evaluation part
    assert list(layers["layer"]) == list(range(LAYERS))
    np.testing.assert_array_equal(zero["accuracy"], layers["accuracy"])  # no near-ties flip
    np.testing.assert_allclose(zero["ece"], layers["ece"], rtol=0, atol=METRIC_TOL)
    np.testing.assert_allclose(zero["mce"], layers["mce"], rtol=0, atol=METRIC_TOL)


def test_layers_before_the_intervention_are_unchanged(steered):
    job_dir, _, _ = steered
    table = steering(job_dir)
    zero = eta_rows(table, 0.0)
    for eta in (2.0, 8.0):
        rows = eta_rows(table, eta)
        before = rows["layer"] < LAYERS - 1  # default intervention layer: the last one (30)
        np.testing.assert_array_equal(rows.loc[before, "accuracy"], zero.loc[before, "accuracy"])
        np.testing.assert_allclose(rows.loc[before, "ece"], zero.loc[before, "ece"],
                                   atol=METRIC_TOL)
        assert (rows.loc[before, "changed"] == 0).all()
        assert (rows.loc[before, "delta_accuracy"] == 0).all()
        assert rows.loc[before, "delta_ece"].abs().max() <= METRIC_TOL
    last8 = eta_rows(table, 8.0).iloc[-1]
    assert abs(last8["delta_ece"]) > 1e-3 or last8["changed"] > 0  # eta 8 does something


def test_direction_files(steered):
    job_dir, summary, loaded = steered
    meta = read_json(job_dir / "direction.json")
    assert meta["model"] == "smollm2"
    assert meta["unembed_hash"] == loaded.unembed_hash == summary["unembed_hash"]
    assert meta["unembed_hash"] == models.tensor_hash(loaded.adapter.unembed_weight)
    assert meta["layers"] == [28, 29, 30]
    assert meta["method"] == "layer_diff"
    assert meta["raw_norm"] > 0
    assert meta["n_examples"] == summary["n_calibration"] == 8
    assert meta["dataset"] == "sst2"
    assert meta["config_hash"] == summary["config_hash"]  # the job the direction came from
    direction = read_direction(job_dir / "direction.safetensors")
    assert direction.hidden == HIDDEN
    assert np.linalg.norm(direction.vector) == pytest.approx(1.0, abs=1e-12)
    assert read_direction(job_dir / "direction.json").meta == meta  # the same metadata inside
    checked = load_direction(job_dir / "direction.safetensors", HIDDEN)
    assert checked.meta["loaded_norm"] == pytest.approx(1.0, abs=1e-12)


def test_direction_equals_hand_computed_layer_diff(steered):
    """c_hat from the cached residuals of the calibration split, the split redone by hand."""
    job_dir, _, loaded = steered
    spec = config("intervention=steering", "eta=[0,2,8]")
    prompt_set = job_mod.prepare(spec).prompt_set
    probe = job_mod.cached_probe(loaded, prompt_set, spec.probe, [27, 28, 29, 30],
                                 spec.cache_dir)
    cal = np.sort(np.random.default_rng(0).permutation(16)[:8])  # seed 0, fraction 0.5
    per_layer = []
    for layer in (28, 29, 30):
        diff = (probe.residuals[layer][cal].astype(np.float64)
                - probe.residuals[layer - 1][cal].astype(np.float64))
        per_layer.append((diff / np.linalg.norm(diff, axis=1, keepdims=True)).mean(axis=0))
    mean = np.mean(per_layer, axis=0)
    vector = read_direction(job_dir / "direction.safetensors").vector
    np.testing.assert_allclose(vector, mean / np.linalg.norm(mean), rtol=0, atol=1e-12)
    assert read_json(job_dir / "direction.json")["raw_norm"] == pytest.approx(np.linalg.norm(mean))


def test_metrics_json(steered):
    job_dir, summary, _ = steered
    metrics = read_json(job_dir / "metrics.json")
    assert metrics["status"] == "complete"
    assert metrics["n_calibration"] + metrics["n_evaluation"] == 16
    assert metrics["n_examples"] == metrics["n_evaluation"] == 8
    assert metrics["intervention"] == "steering" and metrics["study"] == "steering"
    assert set(metrics["steering"]) == {"0", "2", "8"}
    last = eta_rows(steering(job_dir), 8.0).iloc[-1]
    assert metrics["steering"]["8"]["delta_ece"] == pytest.approx(last["delta_ece"], abs=1e-12)
    assert metrics["direction"]["method"] == "layer_diff"
    assert summary["steering"] == metrics["steering"]


def test_another_eta_reuses_the_probe_and_the_model(steered, tmp_path, monkeypatch):
    """eta=4 alone (no intervention=) runs the steering job without a new probe or model load."""
    job_dir0, _, loaded = steered

    def no_probe(*_args, **_kwargs):
        raise AssertionError("score called: the unsteered probe was not reused")

    def no_load(*_args, **_kwargs):
        raise AssertionError("the model was loaded again")

    handed = []

    def spy(*args, **kwargs):
        handed.append(original(*args, **kwargs))
        return handed[-1]

    original = job_mod.load_model
    from calibrate.engine.scoring import SingleToken

    monkeypatch.setattr(SingleToken, "score", no_probe)
    monkeypatch.setattr(models, "_load_model", no_load)
    monkeypatch.setattr(job_mod, "load_model", spy)
    job_dir, summary = run(tmp_path, "eta=4")
    assert len(handed) == 1 and handed[0] is loaded
    assert summary["intervention"] == "steering" and summary["etas"] == [0.0, 4.0]
    table = steering(job_dir)
    assert sorted(table["eta"].unique()) == [0.0, 4.0]
    zero, zero0 = eta_rows(table, 0.0), eta_rows(steering(job_dir0), 0.0)
    np.testing.assert_allclose(zero["ece"], zero0["ece"], atol=METRIC_TOL)
    np.testing.assert_array_equal(zero["accuracy"], zero0["accuracy"])
    np.testing.assert_array_equal(read_direction(job_dir / "direction.safetensors").vector,
                                  read_direction(job_dir0 / "direction.safetensors").vector)


# ---------------------------------------------------------------- loading a direction


def test_loaded_direction_gives_the_same_steering(steered, tmp_path):
    job_dir0, _, _ = steered
    job_dir, summary = run(tmp_path, "intervention=steering", "eta=[0,2,8]",
                           f"direction.path={job_dir0 / 'direction.safetensors'}")
    assert_same_results(steering(job_dir0), steering(job_dir), STEERING_COLUMNS)
    assert_same_results(pd.read_csv(job_dir0 / "layers.csv"), pd.read_csv(job_dir / "layers.csv"))
    meta = read_json(job_dir / "direction.json")
    assert "cross_model_transfer" not in meta and meta["method"] == "layer_diff"
    assert meta["loaded_norm"] == pytest.approx(1.0, abs=1e-12)  # the file held a unit vector
    assert summary["direction"]["loaded_norm"] == meta["loaded_norm"]
    assert summary["n_calibration"] + summary["n_evaluation"] == 16


def test_a_loaded_direction_is_normalised_and_its_norm_recorded(steered, tmp_path):
    """A file holding 5 ĉ steers exactly like ĉ: η is in units of the (unit) direction."""
    job_dir0, _, _ = steered
    fitted = read_direction(job_dir0 / "direction.safetensors")
    save_direction(Direction(5 * fitted.vector, fitted.meta), tmp_path, stem="five")
    job_dir, summary = run(tmp_path, "intervention=steering", "eta=[0,8]",
                           f"direction.path={tmp_path / 'five.safetensors'}")
    meta = read_json(job_dir / "direction.json")
    assert meta["loaded_norm"] == pytest.approx(5.0, rel=1e-12)
    assert summary["direction"]["loaded_norm"] == pytest.approx(5.0, rel=1e-12)
    np.testing.assert_allclose(read_direction(job_dir / "direction.safetensors").vector,
                               fitted.vector, rtol=0, atol=1e-12)
    same = steering(job_dir0)
    same = same[same["eta"].isin([0.0, 8.0])].reset_index(drop=True)
    assert_same_results(same, steering(job_dir), STEERING_COLUMNS)


def test_steering_a_cloze_dataset(tmp_path):
    """ARC-Easy in its default cloze format: c_hat from the last context position, steered there;
    every option's continuation reads the steered context."""
    job_dir, summary = run(tmp_path, "intervention=steering", "dataset=arc_easy", "eta=[0,8]",
                           "intervention.layers=[20]")
    assert summary["answer_format"] == "cloze" and summary["n_evaluation"] == 8
    table = steering(job_dir)
    zero, eight = eta_rows(table, 0.0), eta_rows(table, 8.0)
    layers = pd.read_csv(job_dir / "layers.csv")  # the unsteered cloze scores of the evaluation part
    np.testing.assert_array_equal(zero["accuracy"], layers["accuracy"])
    np.testing.assert_allclose(zero["ece"], layers["ece"], rtol=0, atol=METRIC_TOL)
    before = eight["layer"] < 20  # layers before the edit (layer 20 reads the edited state)
    np.testing.assert_allclose(eight.loc[before, "ece"], zero.loc[before, "ece"], atol=METRIC_TOL)
    assert (eight.loc[before, "changed"] == 0).all()
    after = eight.loc[~before]
    assert after["delta_ece"].abs().max() > 1e-4 or after["changed"].max() > 0


def test_direction_of_another_width_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    vector = rng.standard_normal(640)
    wide = Direction(vector / np.linalg.norm(vector), {"model": "wide", "unembed_hash": "x"})
    save_direction(wide, tmp_path)
    job_dir = tmp_path / "job"
    with pytest.raises(DirectionError, match=r"has width 640 but the model's residual width is 576"):
        job_mod.run_job(config("intervention=steering", "eta=[0,2]",
                               f"direction.path={tmp_path / 'direction.safetensors'}"), job_dir)
    assert_no_results(job_dir)


def test_direction_of_another_model_needs_allow_cross_model(steered, tmp_path):
    job_dir0, _, _ = steered
    fitted = read_direction(job_dir0 / "direction.safetensors")
    other = Direction(fitted.vector,
                      {**fitted.meta, "model": "other-576", "unembed_hash": "0" * 64})
    save_direction(other, tmp_path, stem="other")
    path = f"direction.path={tmp_path / 'other.safetensors'}"
    refused = tmp_path / "refused"
    with pytest.raises(DirectionError, match=r"other-576.*direction\.allow_cross_model=true"):
        job_mod.run_job(config("intervention=steering", "eta=[0,8]", path), refused)
    assert_no_results(refused)
    job_dir, summary = run(tmp_path, "intervention=steering", "eta=[0,8]", path,
                           "direction.allow_cross_model=true")
    meta = read_json(job_dir / "direction.json")
    assert meta["cross_model_transfer"] is True and meta["applied_to"] == "smollm2"
    assert summary["direction"]["cross_model_transfer"] is True
    same = steering(job_dir0)
    same = same[same["eta"].isin([0.0, 8.0])].reset_index(drop=True)
    np.testing.assert_allclose(steering(job_dir)["ece"], same["ece"], rtol=0, atol=METRIC_TOL)


# ---------------------------------------------------------------- other fits


def test_random_direction_runs_and_differs(steered, tmp_path):
    job_dir0, _, _ = steered
    job_dir, summary = run(tmp_path, "intervention=steering", "eta=[0,8]",
                           "direction.method=random")
    meta = read_json(job_dir / "direction.json")
    assert meta["method"] == "random" and summary["direction"]["method"] == "random"
    random = read_direction(job_dir / "direction.safetensors").vector
    fitted = read_direction(job_dir0 / "direction.safetensors").vector
    assert np.linalg.norm(random) == pytest.approx(1.0)
    assert abs(random @ fitted) < 0.5
    seeded = np.random.default_rng(0).standard_normal(HIDDEN)  # direction.seed = seed = 0
    np.testing.assert_array_equal(random, seeded / np.linalg.norm(seeded))
    mine, theirs = eta_rows(steering(job_dir), 8.0), eta_rows(steering(job_dir0), 8.0)
    assert mine.iloc[-1]["ece"] != pytest.approx(theirs.iloc[-1]["ece"], abs=1e-6)
    np.testing.assert_allclose(eta_rows(steering(job_dir), 0.0)["ece"],
                               eta_rows(steering(job_dir0), 0.0)["ece"], atol=METRIC_TOL)


@pytest.mark.skipif(not (SHARED / "data" / "rotten_tomatoes").is_dir(),
                    reason="../shared/data/rotten_tomatoes is absent")
def test_direction_fit_on_another_dataset(steered, tmp_path):
    """Fit on SST-2 (the same 16 sentences as the reference job), evaluate on Rotten Tomatoes:
    the direction must equal the one the reference job fit on SST-2 itself."""
    job_dir0, _, _ = steered
    job_dir, summary = run(tmp_path, "dataset=rotten_tomatoes",
                           f"dataset.local_path={SHARED / 'data' / 'rotten_tomatoes'}",
                           "intervention=steering", "eta=[0,8]", "direction.source=sst2",
                           "direction.source_limit=16")
    meta = read_json(job_dir / "direction.json")
    assert meta["dataset"] == "sst2" and summary["dataset"] == "rotten_tomatoes"
    assert summary["direction"]["dataset"] == "sst2"
    assert meta["n_examples"] == 8
    np.testing.assert_allclose(read_direction(job_dir / "direction.safetensors").vector,
                               read_direction(job_dir0 / "direction.safetensors").vector,
                               atol=1e-12)
    assert len(steering(job_dir)) == 2 * LAYERS
    assert summary["n_calibration"] + summary["n_evaluation"] == 16


# ---------------------------------------------------------------- ablations


@pytest.fixture(scope="module")
def null_basis(steered):
    """The bottom-6 eigenvectors of W_Uᵀ W_U by numpy, and their singular values (the Gram
    matrix in float32, half the time of float64; its bottom-6 subspace agrees to ~1e-7)."""
    _, _, loaded = steered
    w = loaded.adapter.unembed_weight.detach().cpu().float().numpy()
    values, vectors = np.linalg.eigh((w.T @ w).astype(np.float64))
    return vectors[:, :6], np.sqrt(np.clip(values[:6], 0, None))


def ablation_rows(job_dir: Path, variants: list[str]) -> pd.DataFrame:
    table = pd.read_csv(job_dir / "ablation.csv")
    assert sorted(table["variant"].unique()) == sorted(variants)
    assert len(table) == len(variants) * LAYERS
    none = table[table["variant"] == "none"]
    for column in ("delta_accuracy", "delta_ece", "delta_mce", "changed"):
        assert (none[column] == 0).all()
    before = table["layer"] < LAYERS - 1  # default: the last layer is ablated
    assert (table.loc[before, "changed"] == 0).all()
    assert (table.loc[before, "delta_accuracy"] == 0).all()
    assert table.loc[before, "delta_ece"].abs().max() <= METRIC_TOL
    return table


def test_nullspace_job(steered, null_basis, tmp_path):
    job_dir0, _, _ = steered
    job_dir, summary = run(tmp_path, "intervention=nullspace")
    report = read_json(job_dir / "nullspace.json")
    keys = ("k", "rho", "rho_random_mean", "p_value", "max_cosine", "truncation", "random_control")
    assert set(keys) <= set(report)
    assert report["k"] == 6  # round(1% of 576)
    basis, sigma = null_basis
    c = read_direction(job_dir0 / "direction.safetensors").vector  # the same fit
    assert report["rho"] == pytest.approx(np.linalg.norm(basis.T @ c), abs=1e-4)
    np.testing.assert_allclose(report["singular_values"], sigma, rtol=1e-4)
    # single columns (not just the span) matter here: looser, eigenvalue gaps are only ~3
    assert report["max_cosine"] == pytest.approx(np.abs(basis.T @ c).max(), abs=5e-3)
    assert 0 < report["rho_random_mean"] < 1 and 0 < report["p_value"] <= 1
    table = ablation_rows(job_dir, ["none", "nullspace", "random"])
    last = table[(table["variant"] == "nullspace") & (table["layer"] == LAYERS - 1)].iloc[0]
    assert report["truncation"]["delta_ece"] == pytest.approx(last["delta_ece"], abs=1e-12)
    assert summary["intervention"] == "nullspace"
    assert summary["n_calibration"] + summary["n_evaluation"] == 16
    assert summary["ablation"]["k"] == 6


def test_nullspace_with_k_zero_changes_nothing(tmp_path):
    job_dir, _ = run(tmp_path, "intervention=nullspace", "nullspace.k=0")
    report = read_json(job_dir / "nullspace.json")
    assert report["k"] == 0 and report["rho"] == 0.0 and report["max_cosine"] == 0.0
    # An empty basis is the identity (bit for bit: tests/test_ablate.py); here the ablated rows
    # sit at other batch positions than the reference rows, hence METRIC_TOL for ECE/MCE.
    truncation = report["truncation"]
    assert truncation["delta_accuracy"] == 0.0 and truncation["changed"] == 0.0
    assert abs(truncation["delta_ece"]) <= METRIC_TOL and abs(truncation["delta_mce"]) <= METRIC_TOL
    table = ablation_rows(job_dir, ["none", "nullspace", "random"])
    nulled = table[table["variant"] == "nullspace"]
    assert (nulled["changed"] == 0).all() and (nulled["delta_accuracy"] == 0).all()
    assert nulled["delta_ece"].abs().max() <= METRIC_TOL


def test_direction_ablation_job(tmp_path):
    job_dir, summary = run(tmp_path, "intervention=direction_ablate")
    ablation_rows(job_dir, ["none", "direction", "random"])
    assert not (job_dir / "nullspace.json").exists()
    assert not (job_dir / "steering.csv").exists()
    assert summary["intervention"] == "direction_ablate"
    assert set(summary["ablation"]["truncation"]) >= {"delta_accuracy", "delta_ece", "changed"}


# ---------------------------------------------------------------- bad settings


# The direction group's own checks raise its DirectionError (a UserError, as ConfigError is).
BAD = [
    (["intervention=steering", "intervention.position=middle"], ConfigError,
     r"intervention\.position='middle'"),
    (["intervention=steering", "intervention.layers=[99]"], ConfigError,
     r"intervention\.layers=\[99\].*0\.\.30"),  # from the model's config, before its weights
    (["eta=4", "direction.layers=[0]"], DirectionError, r"direction\.layers=\[0\].*1\.\.30"),
    (["eta=4", "direction.calibration_fraction=1.5"], ConfigError,
     r"direction\.calibration_fraction=1\.5"),
    (["eta=4", "direction.method=ica"], DirectionError, r"direction\.method='ica'"),
    (["intervention=nullspace", "intervention.ablation=median"], ConfigError,
     r"intervention\.ablation='median'"),
]


@pytest.mark.parametrize("overrides,error,message", BAD, ids=[b[0][-1] for b in BAD])
def test_bad_settings_fail_cleanly(overrides, error, message, tmp_path):
    job_dir = tmp_path / "job"
    with pytest.raises(error, match=message) as info:
        job_mod.run_job(config(*overrides), job_dir)
    assert type(info.value) is error
    assert_no_results(job_dir)


# ---------------------------------------------------------------- one semantics for eta sweeps

def _as_sweep_job(job_dir: Path, overrides: list[str]) -> None:
    (job_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(overrides), job_dir / ".hydra" / "overrides.yaml")


def test_eta_sweep_jobs_equal_one_job_with_an_eta_list(steered, tmp_path):
    """`-m eta=0,2` and `eta=[0,2]`: the same evaluation split, the same numbers, and a summary
    whose steered columns are the steered values (not the unsteered reference)."""
    from calibrate.io.summary import summarize_sweep

    sweep = tmp_path / "sweep"
    for index, eta in enumerate(("0", "2", "8")):
        job_mod.run_job(config(f"eta={eta}"), sweep / str(index))
        _as_sweep_job(sweep / str(index), [f"eta={eta}"])
    one = steering(steered[0])
    zero = read_json(sweep / "0" / "metrics.json")
    # eta=0 evaluates the evaluation split, like every other job of the sweep
    assert zero["study"] == "steering" and zero["n_examples"] == 8
    for index, eta in ((1, 2.0), (2, 8.0)):
        metrics = read_json(sweep / str(index) / "metrics.json")
        assert metrics["n_examples"] == 8 and metrics["final"] == pytest.approx(zero["final"])
        mine = eta_rows(steering(sweep / str(index)), eta)
        np.testing.assert_allclose(mine[["accuracy", "ece", "mce"]].to_numpy(),
                                   eta_rows(one, eta)[["accuracy", "ece", "mce"]].to_numpy(),
                                   atol=METRIC_TOL)
    table = summarize_sweep(sweep)
    assert list(table["eta"]) == [0.0, 2.0, 8.0] and list(table["study"]) == ["steering"] * 3
    assert table.loc[0, "steered_ece"] == pytest.approx(table.loc[0, "ece"], abs=METRIC_TOL)
    assert table.loc[0, "delta_ece"] == pytest.approx(0.0, abs=METRIC_TOL)
    final = one[one["layer"] == LAYERS - 1].set_index("eta")
    for row in table.iloc[1:].itertuples():
        assert row.steered_ece == pytest.approx(final.loc[row.eta, "ece"], abs=METRIC_TOL)
        assert row.delta_ece == pytest.approx(final.loc[row.eta, "delta_ece"], abs=METRIC_TOL)
        assert row.ece == pytest.approx(zero["final"]["ece"])  # the unsteered reference
    assert table.loc[2, "steered_ece"] != pytest.approx(table.loc[2, "ece"], abs=1e-6)
    # beside every eta: the temperature-scaled ECE at the steered layer and the random null
    baselines = pd.read_csv(sweep / "1" / "baselines.csv")
    ts = baselines[(baselines["method"] == "temperature") & (baselines["layer"] == LAYERS - 1)]
    np.testing.assert_allclose(table["temperature_ece"], float(ts["ece"].iloc[0]), rtol=1e-12)
    null = pd.read_csv(sweep / "1" / "null.csv")
    assert table.loc[1, "p_value_ece"] == pytest.approx(float(null["p_value_ece"].iloc[0]))
    assert pd.isna(table.loc[0, "p_value_ece"])  # eta = 0 is the reference, not tested


def test_an_eta_that_swamps_the_residual_is_warned_with_the_ratio(steered, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="calibrate"):
        run(tmp_path, "eta=[1e6]", "output.predictions=false")
    warned = [r.getMessage() for r in caplog.records if "mean residual norm" in r.getMessage()]
    assert len(warned) == 1 and "eta=1e+06 adds an edit" in warned[0], caplog.text
    ratio = float(warned[0].split("an edit ")[1].split(" times")[0])
    assert 100 < ratio < 1e6  # SmolLM2's last-layer residual norm is ~1e3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="calibrate"):
        run(tmp_path / "small", "eta=[2]", "output.predictions=false")
    assert "swamped" not in caplog.text
    # ... and the paper's absolute eta=2 is ~0.2 % of SmolLM2's residual: the tiny-edit warning
    (tiny,) = [r.getMessage() for r in caplog.records if "adds an edit only" in r.getMessage()]
    assert tiny.startswith("eta=2 adds an edit only 0.00") and "eta_scale=residual_norm" in tiny
