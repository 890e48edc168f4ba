"""Tracking: an offline W&B run carries the per-layer series, tables and summary keys; its group
is the sweep or the job; a failed job leaves no run; a sweep's runs are found by the documented
sync glob; W&B failures never fail a job."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings

import pandas as pd
import pytest
from wandb_records import read_run

from calibrate.io import track

TABLE = pd.DataFrame({"layer": [0, 1, 2], "accuracy": [0.5, 0.6, 0.7], "ece": [0.3, 0.2, 0.1],
                      "mce": [0.5, 0.4, 0.3]})
CFG = track.TrackerSettings(name="wandb", project="calibrate-test", entity=None, mode="offline",
                            group=None, tags=("extra",), dir=None)
CONFIG = {"model": {"name": "smollm2"}, "dataset": {"name": "sst2"}, "seed": 0}


def records(job_dir) -> list[dict]:
    """Every offline run under ``job_dir``, read from its run file (after W&B has flushed)."""
    import wandb

    wandb.teardown()  # finish() returns before the service has flushed the run file
    return [read_run(f) for f in sorted(job_dir.glob("wandb/offline-run-*/run-*.wandb"))]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    job_dir = tmp_path_factory.mktemp("job")
    tracker = track.open_tracker(CFG, job_dir, "smollm2-sst2", "sweep-1", "probe", CONFIG)
    assert isinstance(tracker, track.WandbTracker)
    tracker.log_layers(TABLE)
    tracker.log_layers(TABLE.assign(ece=TABLE.ece / 2), prefix="steered/eta=4/")
    tracker.log_series("nullspace", {"rho": {31: 0.02, 30: 0.01}, "norm": {30: 4.5, 31: 3.5}})
    tracker.log_summary({"final/accuracy": 0.7, "final/ece": 0.1, "plateau_layer": 2,
                         "peak_ece_layer": None})
    assert not (job_dir / "wandb").exists()  # nothing until the job has finished
    tracker.finish()
    assert len(list(job_dir.glob("wandb/offline-run-*"))) == 1
    (run,) = records(job_dir)
    return run


def test_per_layer_series_use_layer_as_step(offline_run):
    assert offline_run["metrics"]["layer/*"] == "layer"
    assert offline_run["metrics"]["steered/eta=4/*"] == "layer"
    rows = [r for r in offline_run["history"] if "layer/ece" in r]
    assert [json.loads(r["layer"]) for r in rows] == [0, 1, 2]
    assert [json.loads(r["layer/ece"]) for r in rows] == [0.3, 0.2, 0.1]
    assert any("layer_table/_type" in r for r in offline_run["history"])  # the table itself


def test_summary_run_group_and_tags(offline_run):
    summary = offline_run["summary"]
    assert json.loads(summary["final/accuracy"]) == 0.7
    assert json.loads(summary["plateau_layer"]) == 2
    assert "peak_ece_layer" in summary
    run = offline_run["run"]
    assert run["group"] == "sweep-1" and run["job_type"] == "probe"
    assert {"extra", "smollm2", "sst2"} <= set(run["tags"])


def test_none_tracker_logs_nothing(tmp_path):
    tracker = track.open_tracker(track.TrackerSettings(name="none"), tmp_path, "x", None, "probe",
                                 CONFIG)
    tracker.log_layers(TABLE)
    tracker.finish()
    assert not any(tmp_path.iterdir())


def test_unreachable_online_falls_back_to_offline(tmp_path, monkeypatch):
    real = track._init_wandb

    def fake(cfg, job_dir, name, group, job_type, config, mode):
        if mode == "online":
            raise ConnectionError("api.wandb.ai unreachable")
        return real(cfg, job_dir, name, group, job_type, config, mode)

    monkeypatch.setattr(track, "_init_wandb", fake)
    online = dataclasses.replace(CFG, mode="online")
    tracker = track.open_tracker(online, tmp_path, "x", None, "probe", CONFIG)
    assert isinstance(tracker, track.WandbTracker)
    tracker.log_summary({"final/ece": 0.1})
    with pytest.warns(UserWarning, match="falling back to offline"):  # the run opens at finish
        tracker.finish()
    assert list(tmp_path.glob("wandb/offline-run-*"))


def test_logging_errors_warn_and_never_raise(tmp_path):
    class Broken:
        def __getattr__(self, name):
            def fail(*_a, **_k):
                raise RuntimeError("W&B service died")
            return fail

    tracker = track.WandbTracker(lambda: Broken())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.log_layers(TABLE)
        tracker.log_summary({"a": 1})
        tracker.finish()
    assert len(caught) == 3 and all("local results are unaffected" in str(w.message) for w in caught)


def test_series_over_layer_for_the_null_space(offline_run):
    assert offline_run["metrics"]["nullspace/*"] == "layer"
    rows = [r for r in offline_run["history"] if "nullspace/rho" in r]
    assert [json.loads(r["layer"]) for r in rows] == [30, 31]  # sorted by layer
    assert [json.loads(r["nullspace/rho"]) for r in rows] == [0.01, 0.02]
    assert [json.loads(r["nullspace/norm"]) for r in rows] == [4.5, 3.5]
    assert any("nullspace_table/_type" in r for r in offline_run["history"])


def test_series_over_another_x(tmp_path):
    tracker = track.open_tracker(CFG, tmp_path, "x", None, "steering", CONFIG)
    table = pd.DataFrame({"eta": [0.0, 4.0], "ece": [0.2, 0.1]})
    tracker.log_series("steering/final", table, x="eta")
    tracker.log_series("empty", {})  # nothing to log: no error, no keys
    tracker.finish()
    (run,) = records(tmp_path)
    assert run["metrics"]["steering/final/*"] == "eta"
    rows = [r for r in run["history"] if "steering/final/ece" in r]
    got = [(json.loads(r["eta"]), json.loads(r["steering/final/ece"])) for r in rows]
    assert got == [(0.0, 0.2), (4.0, 0.1)]
    assert not any(k.startswith("empty") for r in run["history"] for k in r)


def test_single_run_group_is_the_job_name(tmp_path):
    tracker = track.open_tracker(CFG, tmp_path, "smollm2-sst2-eta=4", None, "steering", CONFIG)
    tracker.log_summary({"final/ece": 0.1})
    tracker.finish()
    (run,) = records(tmp_path)
    assert run["run"]["group"] == run["run"]["name"] == "smollm2-sst2-eta=4"
    assert run["run"]["job_type"] == "steering"


@pytest.mark.parametrize("error", [RuntimeError("probe failed"), KeyboardInterrupt()],
                         ids=["exception", "interrupt"])
def test_failed_job_leaves_no_offline_run(tmp_path, error):
    """The job's pattern (calibrate.job.run_job): log, fail before results exist, finish(1)."""
    tracker = track.open_tracker(CFG, tmp_path, "x", None, "probe", CONFIG)
    with pytest.raises(type(error)):
        try:
            tracker.log_layers(TABLE)
            tracker.log_summary({"final/ece": 0.1})
            raise error
        except BaseException:
            tracker.finish(exit_code=1)
            raise
    tracker.finish()  # a second finish changes nothing
    assert not list(tmp_path.glob("wandb/offline-run-*")) and not (tmp_path / "wandb").exists()


def test_sweep_runs_are_found_by_the_sync_glob(tmp_path):
    """Two jobs of a sweep (``<sweep>/<job num>/``), one failed: the documented glob finds both
    finished runs, each in the sweep's group, and nothing else."""
    sweep = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    for num, ece in (("0", 0.3), ("1", 0.2)):
        tracker = track.open_tracker(CFG, sweep / num, f"smollm2-sst2-eta={num}", sweep.name,
                                     "probe", CONFIG)
        tracker.log_layers(TABLE.assign(ece=ece))
        tracker.finish()
    failed = track.open_tracker(CFG, sweep / "2", "smollm2-sst2-eta=2", sweep.name, "probe",
                                CONFIG)
    failed.log_layers(TABLE)
    failed.finish(exit_code=1)
    found = sorted(sweep.glob(track.SYNC_GLOB))
    assert track.SYNC_GLOB == "*/wandb/offline-run-*"
    assert "wandb sync multirun/<date>/<time>/*/wandb/offline-run-*" in track.__doc__
    assert [p.relative_to(sweep).parts[0] for p in found] == ["0", "1"]
    assert all(p.is_dir() and p.name.startswith("offline-run-") for p in found)
    runs = [run for num in ("0", "1") for run in records(sweep / num)]
    assert [r["run"]["group"] for r in runs] == [sweep.name, sweep.name]
    first_ece = [next(json.loads(h["layer/ece"]) for h in r["history"] if "layer/ece" in h)
                 for r in runs]
    assert first_ece == [0.3, 0.2]
    # what `wandb sync` itself makes of the glob (dry run: no server, no upload)
    cli = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run",
                          *(str(p.relative_to(sweep)) for p in found)],
                         cwd=sweep, capture_output=True, text=True, timeout=120)
    out = cli.stdout + cli.stderr
    assert cli.returncode == 0 and "Would sync 2 run(s)" in out, out


def test_steering_table_gives_eta_curves_over_eta(tmp_path):
    """A table over eta and layer (the steering table) is also logged as its last layer's
    metrics over ``eta``, so a group's runs overlay against η without panel setup."""
    steering = pd.DataFrame({"eta": [0.0, 0.0, 4.0, 4.0], "layer": [0, 1, 0, 1],
                             "ece": [0.3, 0.2, 0.3, 0.1], "significant_ece": [False] * 4})
    assert track.eta_curves(TABLE) is None
    assert track.eta_curves(steering)["ece"].tolist() == [0.2, 0.1]
    tracker = track.open_tracker(CFG, tmp_path, "x", "g", "steering", CONFIG)
    tracker.log_layers(TABLE)
    tracker.log_table("steering", steering)
    tracker.finish()
    (run,) = records(tmp_path)
    assert run["metrics"]["eta/*"] == "eta" and run["metrics"]["layer/*"] == "layer"
    rows = [r for r in run["history"] if "eta/ece" in r]
    assert [(json.loads(r["eta"]), json.loads(r["eta/ece"])) for r in rows] == [(0.0, 0.2),
                                                                               (4.0, 0.1)]
    assert not any("eta/significant_ece" in r for r in run["history"])  # flags are no series


# ---------------------------------------------------------------- the tracker group, checked
# (moved from tests/test_validate.py: calibrate.config.validate.check_tracker is TrackerSettings)

def test_tracker_settings_are_checked():
    import re

    from conftest import typed

    from calibrate.errors import ConfigError
    from calibrate.io.track import TrackerSettings

    composed = typed().tracker
    assert composed.name == "wandb" and composed.mode == "offline"
    assert isinstance(composed, TrackerSettings) and typed("tracker=none").tracker.name == "none"
    assert TrackerSettings(name="none").name == "none"
    with pytest.raises(ConfigError, match=re.escape("tracker='mlflow'") + ".*wandb, none"):
        TrackerSettings(name="mlflow")
    with pytest.raises(ConfigError,
                       match=re.escape("tracker.mode='x'") + ".*offline, online, disabled"):
        TrackerSettings(name="wandb", mode="x")
    with pytest.raises(ConfigError, match=re.escape("tracker.mode='x'")):
        typed("tracker.mode=x")
    for mode in ("offline", "online", "disabled"):
        assert TrackerSettings(name="wandb", mode=mode).mode == mode
    with pytest.raises(ConfigError, match=re.escape("tracker.tags='a'; accepted: a list of strings")):
        TrackerSettings(tags="a")
    with pytest.raises(ConfigError, match=re.escape("tracker.init_timeout=0; accepted: a number")):
        TrackerSettings(init_timeout=0)
