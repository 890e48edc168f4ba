"""calibrate.io.report.synthetic: made-up sweeps that the comparison reads as complete runs
with every file of the job contract the figures use."""

from __future__ import annotations

import pandas as pd

from calibrate.io.compare import load_runs
from calibrate.io.compare.facets import eta_unit
from calibrate.io.report.synthetic import write_sweep
from calibrate.io.summary import SUMMARY_FILE


def test_sweep_is_read_as_complete_steering_runs(tmp_path):
    sweep = write_sweep(tmp_path / "s", 8, failed=1)
    runs = load_runs([sweep])
    assert [r.complete for r in runs] == [True] * 8 + [False]
    assert all(r.steering for r in runs[:8])
    assert {(r.metrics["model"], r.metrics["dataset"]) for r in runs[:8]} == {
        ("smollm2", "sst2"), ("gemma3_270m", "sst2"), ("smollm2", "arc_easy"),
        ("gemma3_270m", "arc_easy")}
    summary = pd.read_csv(sweep / SUMMARY_FILE)
    assert set(summary["status"]) == {"complete", "failed"}


def test_files_follow_the_contract(tmp_path):
    run = load_runs([write_sweep(tmp_path / "s", 1)])[0]
    assert {"accuracy_lo", "accuracy_hi", "ece_lo", "ece_hi"} <= set(run.layers.columns)
    steering = run.table("steering.csv")
    assert {"delta_ece_lo", "delta_ece_hi", "significant_ece"} <= set(steering.columns)
    assert (steering.loc[steering["eta"] == 0, "delta_ece"] == 0).all()
    null = run.table("null.csv")
    assert {"null_delta_ece_p05", "null_delta_ece_p95", "null_delta_ece_median"} <= set(null)
    assert 0.0 not in set(null["eta"])
    baselines = run.table("baselines.csv")
    assert set(baselines["method"]) == {"temperature", "histogram"}
    assert len(baselines) == 2 * len(run.layers)


def test_hundred_runs_cover_both_eta_units(tmp_path):
    runs = load_runs([write_sweep(tmp_path / "s", 100, summary=False, nullspace=False)])
    assert len(runs) == 100 and {eta_unit(r) for r in runs} == {"absolute", "residual_norm"}
    assert len({r.row["direction_layers"] for r in runs}) == 10  # 5 ranges x 2 depths
