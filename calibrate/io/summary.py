"""The sweep summary: one ``summary.csv`` row per job of a multirun, gathered at its end.

Rows are read from the job directories (``metrics.json`` or ``error.json``), so the summary is
right whatever launcher ran the jobs, and a job that did not complete shows as ``failed`` or
``incomplete`` instead of disappearing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from calibrate.io import results

SUMMARY_FILE = "summary.csv"
STEERING_SUMMARY_FILE = "steering_summary.csv"


def _overrides(job_dir: Path) -> str:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    return " ".join(str(o) for o in OmegaConf.load(path))


STEERED = ("accuracy", "ece", "mce")
DELTAS = ("delta_accuracy", "delta_ece", "delta_mce", "changed", "delta_ece_lo", "delta_ece_hi",
          "significant_ece")


def job_row(job_dir: Path) -> dict[str, Any]:
    """One summary row: the job's overrides, status and final metrics (for a steering job, the
    unsteered reference on its evaluation split; :func:`job_rows` adds the steered columns)."""
    row: dict[str, Any] = {"job": job_dir.name, "overrides": _overrides(job_dir)}
    metrics = results.read_metrics(job_dir)
    error_path = job_dir / results.ERROR_FILE
    if metrics is not None:
        row.update(status="complete", study=metrics.get("study"), model=metrics.get("model"),
                   dataset=metrics.get("dataset"), split=metrics.get("split"),
                   answer_format=metrics.get("answer_format"), cloze_norm=metrics.get("cloze_norm"),
                   n_examples=metrics.get("n_examples"), config_hash=metrics.get("config_hash"))
        row.update({k: v for k, v in metrics.get("final", {}).items()})
        for key in ("plateau_layer", "peak_ece_layer", "peak_ece", "emergence_layer", "phase_kind"):
            row[key] = metrics.get(key)
    elif error_path.is_file():
        error = json.loads(error_path.read_text())
        row.update(status="failed", error=f"{error.get('error_type')}: {error.get('error')}")
    else:
        row.update(status="incomplete")
    return row


def job_rows(job_dir: Path) -> list[dict[str, Any]]:
    """The job's summary rows: one, or for a steering job one per η, each with the steered
    final-layer metrics (``steered_accuracy`` …) and deltas against η = 0 on the same
    evaluation examples, beside the unsteered reference (``accuracy``, ``ece`` …)."""
    row = job_row(job_dir)
    metrics = results.read_metrics(job_dir) if row.get("status") == "complete" else None
    steering = (metrics or {}).get("steering") or {}
    if not steering:
        return [row]
    direction = metrics.get("direction") or {}
    head = {**row, "intervention_layers": str(metrics.get("intervention_layers")),
            "eta_scale": metrics.get("eta_scale"), "direction_method": direction.get("method"),
            "direction_layers": str(direction.get("layers")),
            "cosine_layer_diff": direction.get("cosine_layer_diff"),
            "null_space_rho": direction.get("null_space_rho")}
    etas = [float(e) for e in metrics.get("etas") or steering]
    asked = [e for e in etas if e != 0.0] or [0.0]  # eta=0 alone is the reference itself
    baselines = metrics.get("baselines") or {}
    head.update({f"{method}_ece": values.get("ece") for method, values in baselines.items()})
    null = {float(r["eta"]): r for r in (metrics.get("null") or {}).get("per_eta") or []}
    out = []
    for eta in asked:
        values = steering.get(f"{eta:g}", {})
        row = null.get(eta, {})
        out.append({**head, "eta": eta, **{f"steered_{m}": values.get(m) for m in STEERED},
                    **{d: values.get(d) for d in DELTAS},
                    "null_delta_ece_median": row.get("null_delta_ece_median"),
                    "p_value_ece": row.get("p_value_ece")})
    return out


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job directories of a sweep: sub-folders holding a ``.hydra`` folder, in job order."""
    found = [p for p in Path(sweep_dir).iterdir() if (p / ".hydra").is_dir()]
    return sorted(found, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def steering_rows(job_dir: Path) -> list[dict[str, Any]]:
    """Final-layer rows of a steering job (one per eta) with the direction's layer range."""
    metrics = results.read_metrics(job_dir)
    path = job_dir / "steering.csv"
    if metrics is None or not path.is_file():
        return []
    table = pd.read_csv(path)
    final = table[table["layer"] == table["layer"].max()]
    direction = metrics.get("direction") or {}
    head = {"job": job_dir.name, "overrides": _overrides(job_dir), "model": metrics.get("model"),
            "dataset": metrics.get("dataset"), "direction_method": direction.get("method"),
            "direction_layers": str(direction.get("layers")),
            "direction_dataset": direction.get("dataset")}
    return [{**head, **row} for row in final.to_dict("records")]


def summarize_sweep(sweep_dir: Path) -> pd.DataFrame:
    """Write ``summary.csv`` for a sweep directory (and, when jobs steered,
    ``steering_summary.csv``: one row per job and eta, e.g. layer range x eta) and return it."""
    dirs = job_dirs(sweep_dir)
    table = pd.DataFrame([row for d in dirs for row in job_rows(d)])
    results.write_csv(Path(sweep_dir) / SUMMARY_FILE, table)
    steering = [row for d in dirs for row in steering_rows(d)]
    if steering:
        results.write_csv(Path(sweep_dir) / STEERING_SUMMARY_FILE, pd.DataFrame(steering))
    return table


def tally(table: pd.DataFrame) -> dict[str, int]:
    """Jobs by status (a steering job with several η rows counts once)."""
    if not len(table):
        return {}
    jobs = table.drop_duplicates("job")
    return {str(k): int(v) for k, v in jobs["status"].value_counts().items()}


LAST_TALLY: dict[str, int] = {}  # the last sweep's tally in this process (the CLI's exit status)


class SweepSummary(Callback):
    """Hydra callback: gather ``summary.csv`` when a multirun ends, and end with a tally."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        counts = tally(summarize_sweep(sweep_dir))
        LAST_TALLY.clear()
        LAST_TALLY.update(counts)
        parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        print(f"[calibrate] sweep: {sum(counts.values())} jobs: {parts or 'none'}; "
              f"summary {sweep_dir / SUMMARY_FILE}", file=sys.stderr)
