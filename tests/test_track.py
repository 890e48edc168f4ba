"""Tracking: an offline W&B run carries the per-layer series, tables and summary keys; W&B
failures never fail a job."""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest

from calibrate import track
from wandb_records import read_run

TABLE = pd.DataFrame({"layer": [0, 1, 2], "accuracy": [0.5, 0.6, 0.7], "ece": [0.3, 0.2, 0.1],
                      "mce": [0.5, 0.4, 0.3]})
CFG = {"name": "wandb", "project": "calibrate-test", "entity": None, "mode": "offline",
       "group": None, "tags": ["extra"], "dir": None}
CONFIG = {"model": {"name": "smollm2"}, "dataset": {"name": "sst2"}, "seed": 0}


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    job_dir = tmp_path_factory.mktemp("job")
    tracker = track.open_tracker(CFG, job_dir, "smollm2-sst2", "sweep-1", "none", CONFIG)
    assert isinstance(tracker, track.WandbTracker)
    tracker.log_layers(TABLE)
    tracker.log_layers(TABLE.assign(ece=TABLE.ece / 2), prefix="steered/eta=4/")
    tracker.log_summary({"final/accuracy": 0.7, "final/ece": 0.1, "plateau_layer": 2,
                         "peak_ece_layer": None})
    tracker.finish()
    import wandb

    wandb.teardown()  # finish() returns before the service has flushed the run file
    files = list(job_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    return read_run(files[0])


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
    assert run["group"] == "sweep-1" and run["job_type"] == "none"
    assert {"extra", "smollm2", "sst2"} <= set(run["tags"])


def test_none_tracker_logs_nothing(tmp_path):
    tracker = track.open_tracker({"name": "none"}, tmp_path, "x", None, "none", CONFIG)
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
    with pytest.warns(UserWarning, match="falling back to offline"):
        tracker = track.open_tracker({**CFG, "mode": "online"}, tmp_path, "x", None, "none", CONFIG)
    assert isinstance(tracker, track.WandbTracker)
    tracker.finish()
    assert list(tmp_path.glob("wandb/offline-run-*"))


def test_logging_errors_warn_and_never_raise(tmp_path):
    class Broken:
        def __getattr__(self, name):
            def fail(*_a, **_k):
                raise RuntimeError("W&B service died")
            return fail

    tracker = track.WandbTracker(Broken())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.log_layers(TABLE)
        tracker.log_summary({"a": 1})
        tracker.finish()
    assert len(caught) == 3 and all("local results are unaffected" in str(w.message) for w in caught)
