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


def _overrides(job_dir: Path) -> str:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    return " ".join(str(o) for o in OmegaConf.load(path))


def job_row(job_dir: Path) -> dict[str, Any]:
    """One summary row: the job's overrides, status and final metrics (for a study on a split,
    the unsteered reference on its evaluation split; :func:`job_rows` adds the study's own)."""
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
    """The job's summary rows: its plain row, extended by each of the rows its study recorded
    in metrics.json (``summary_rows``: e.g. one per η with the steered values)."""
    row = job_row(job_dir)
    metrics = results.read_metrics(job_dir) if row.get("status") == "complete" else None
    extra = (metrics or {}).get("summary_rows") or []
    return [{**row, **more} for more in extra] or [row]


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job directories of a sweep: sub-folders holding a ``.hydra`` folder, in job order."""
    found = [p for p in Path(sweep_dir).iterdir() if (p / ".hydra").is_dir()]
    return sorted(found, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def sweep_table_rows(job_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """The rows a job adds to each of its sweep's extra tables (metrics.json ``sweep_tables``)."""
    metrics = results.read_metrics(job_dir)
    tables = (metrics or {}).get("sweep_tables") or {}
    head = {"job": job_dir.name, "overrides": _overrides(job_dir),
            "model": (metrics or {}).get("model"), "dataset": (metrics or {}).get("dataset")}
    return {name: [{**head, **row} for row in rows] for name, rows in tables.items()}


def summarize_sweep(sweep_dir: Path) -> pd.DataFrame:
    """Write ``summary.csv`` for a sweep directory (and the tables its jobs' studies add, e.g.
    ``steering_summary.csv``: one row per job and eta) and return it."""
    dirs = job_dirs(sweep_dir)
    table = pd.DataFrame([row for d in dirs for row in job_rows(d)])
    results.write_csv(Path(sweep_dir) / SUMMARY_FILE, table)
    extra: dict[str, list[dict[str, Any]]] = {}
    for d in dirs:
        for name, rows in sweep_table_rows(d).items():
            extra.setdefault(name, []).extend(rows)
    for name, rows in extra.items():
        results.write_csv(Path(sweep_dir) / f"{results.safe_stem(name)}.csv", pd.DataFrame(rows))
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
