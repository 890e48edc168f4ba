"""calibrate.io.summary: summary.csv shows what this invocation did (a refused job as refused,
never as its folder's old result), and the sweep's exit status follows the tally."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from calibrate.io import summary

STEERING_SUMMARY = "steering_summary.csv"


def complete_job(folder: Path, limit: int, steering: bool = False) -> Path:
    """A job folder with a complete result (another config's, for the refusal cases)."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(f"- dataset.limit={limit}\n")
    metrics = {"status": "complete", "config_hash": f"h{limit}", "n_examples": limit,
               "final": {"accuracy": 0.5, "ece": 0.1}}
    if steering:  # the steering study's rows of its sweep's steering_summary.csv
        metrics.update(etas=[0.0, 4.0], steering={"4": {"accuracy": 0.5, "ece": 0.05}},
                       sweep_tables={"steering_summary": [{"eta": 0.0, "layer": 3, "ece": 0.1},
                                                          {"eta": 4.0, "layer": 3, "ece": 0.05}]})
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.mark.parametrize("counts, status", [
    ({}, 0), ({"complete": 3}, 0), ({"complete": 1, "refused": 1}, 2), ({"refused": 2}, 2),
    ({"refused": 1, "failed": 1}, 1), ({"complete": 1, "incomplete": 1}, 1),
])
def test_exit_status_follows_the_tally(counts, status):
    assert summary.exit_status(counts) == status


def test_a_refused_job_is_refused_not_its_folders_old_result(tmp_path, monkeypatch):
    monkeypatch.setenv(summary.RUN_ENV, "this")
    sweep = tmp_path / "sweep"
    old = complete_job(sweep / "0", 9, steering=True)
    complete_job(sweep / "1", 3)
    fresh = sweep / "2"  # refused before anything was written: no .hydra/ at all
    summary.record_refusal(sweep, old, ["dataset.limit=4", "eta=[0,4]"],
                           ValueError("folder holds another config"))
    summary.record_refusal(sweep, fresh, ["dataset.limit=5"], ValueError("held by pid 7"))
    monkeypatch.setenv(summary.RUN_ENV, "another")  # another invocation's note: not ours
    summary.record_refusal(sweep, sweep / "1", ["dataset.limit=3"], ValueError("x"))
    monkeypatch.setenv(summary.RUN_ENV, "this")
    table = summary.summarize_sweep(sweep, summary.refusals(sweep))
    expected = pd.DataFrame({
        "job": ["0", "1", "2"], "overrides": ["dataset.limit=4 eta=[0,4]", "dataset.limit=3",
                                             "dataset.limit=5"],
        "status": ["refused", "complete", "refused"],
        "error": ["ValueError: folder holds another config", None, "ValueError: held by pid 7"]})
    pd.testing.assert_frame_equal(table[list(expected.columns)], expected)
    assert summary.tally(table) == {"refused": 2, "complete": 1}
    assert not (sweep / STEERING_SUMMARY).exists()  # job 0's old steering rows
    assert pd.read_csv(sweep / summary.SUMMARY_FILE)["status"].tolist() == list(expected["status"])
    summary.forget_refusals(sweep, "this")
    assert list(summary.refusals(sweep, "another")) == [(sweep / "1").absolute()]
    assert summary.refusals(sweep, "this") == {}


def test_a_stale_steering_summary_goes(tmp_path):
    sweep = tmp_path / "sweep"
    complete_job(sweep / "0", 2, steering=True)
    summary.summarize_sweep(sweep)
    rows = pd.read_csv(sweep / STEERING_SUMMARY)
    assert rows["job"].astype(str).tolist() == ["0", "0"] and rows["ece"].tolist() == [0.1, 0.05]
    (sweep / "0" / "metrics.json").write_text(json.dumps({"status": "complete"}))
    summary.summarize_sweep(sweep)
    assert not (sweep / STEERING_SUMMARY).exists()
