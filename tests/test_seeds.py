"""Steering results aggregated over runs that differ only in their seed, against hand sums."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calibrate.io.compare.runs import Run
from calibrate.io.compare.seeds import run_seed, seed_rows


def _run(seed: int, deltas: dict[str, float], model: str = "smollm2", flagged=(),
         p_matched: float = 0.5, extra: tuple[str, ...] = ()) -> Run:
    steering = {"0": {"delta_ece": 0.0}}
    for eta, delta in deltas.items():
        steering[eta] = {"delta_ece": delta, "delta_accuracy": 0.01,
                         "significant_adjusted_ece": eta in flagged, "significant_ece": True,
                         "temperature": 1.0 + delta, "residual_kl": 0.001, "kl": 0.002}
    per_eta = [{"eta": float(e), "p_matched_ece": p_matched, "p_value_ece": 0.9,
                "n_random": 1000} for e in deltas]
    metrics = {"model": model, "dataset": "sst2", "steering": steering, "eta_scale": "absolute",
               "n_evaluation": 436, "config": {"seed": seed},
               "null": {"per_eta": per_eta},
               "baselines": {"temperature": {"ece": 0.03, "delta_ece": -0.05 - seed / 100,
                                             "significant_adjusted_ece": True},
                             "histogram": {"ece": 0.04, "delta_ece": -0.04}}}
    overrides = [f"model={model}", f"seed={seed}", "tracker=none", *extra]
    return Run("sweep", Path(f"/x/{model}/{seed}"), overrides, {"status": "complete"}, metrics)


def test_runs_differing_in_seed_alone_are_aggregated_by_hand():
    deltas = {0: 0.010, 1: 0.004, 2: -0.002}
    runs = [_run(s, {"0.1": d, "0.2": 0.02 + s / 100}, flagged=("0.2",) if s else ())
            for s, d in deltas.items()]
    runs.append(_run(0, {"0.1": 0.5}, model="gemma3_270m"))  # one seed only: no row
    table = seed_rows(runs).set_index("eta")
    assert len(table) == 2 and set(table["model"]) == {"smollm2"}
    row = table.loc[0.1]
    values = np.array(list(deltas.values()))
    assert row["seeds"] == 3 and row["n_evaluation"] == 436
    assert row["delta_ece_mean"] == pytest.approx(values.mean())
    assert row["delta_ece_sd"] == pytest.approx(values.std(ddof=1))
    assert (row["delta_ece_min"], row["delta_ece_max"]) == (-0.002, 0.010)
    assert row["sign"] == "mixed" and row["flagged_adjusted"] == 0
    assert row["temperature_mean"] == pytest.approx(1.0 + values.mean())
    assert row["p_matched_ece_max"] == 0.5 and row["n_random"] == 1000
    assert row["best_baseline"] == "temperature"
    assert row["best_baseline_delta_ece_mean"] == pytest.approx(-0.06)
    assert row["best_baseline_flagged"] == 3
    kept = table.loc[0.2]
    assert kept["sign"] == "+" and kept["flagged_adjusted"] == 2


def test_other_overrides_split_groups_and_the_seed_is_read_from_the_config():
    runs = [_run(s, {"0.1": -0.01}, extra=(f"direction.method={m}",))
            for s in (0, 1) for m in ("pca", "probe")]
    table = seed_rows(runs)
    assert sorted(table["overrides"]) == ["direction.method=pca model=smollm2",
                                          "direction.method=probe model=smollm2"]
    assert (table["sign"] == "−").all() and run_seed(runs[1]) == 0


def test_the_fitted_eta_of_every_seed_is_one_row():
    """``eta: fit`` steers each seed's direction at its own fitted η: those cells are one row
    (eta NaN, eta_label with the lowest and highest), the grid η keep theirs."""
    fits = {0: 0.284, 1: 0.0135, 2: 0.243}
    runs = []
    for s, fit in fits.items():
        run = _run(s, {"0.1": 0.01 * s, f"{fit:g}": -0.02 - s / 100})
        run.metrics["eta_fit"] = fit
        runs.append(run)
    table = seed_rows(runs)
    assert table["eta_label"].tolist() == ["0.1", "fit (0.0135–0.284)"]
    grid, fit = table.iloc[0], table.iloc[1]
    assert grid["eta"] == 0.1 and grid["seeds"] == 3
    assert np.isnan(fit["eta"]) and fit["seeds"] == 3
    assert fit["delta_ece_mean"] == pytest.approx(np.mean([-0.02, -0.03, -0.04]))
    assert (fit["delta_ece_min"], fit["delta_ece_max"]) == (-0.04, -0.02)
    assert fit["sign"] == "−" and fit["n_random"] == 1000
