"""The sweep summary: one ``summary.csv`` row per job of a multirun, gathered at its end.

Rows are read from the job directories (``metrics.json`` or ``error.json``), so the summary is
right whatever launcher ran the jobs, and a job that did not complete shows as ``failed`` or
``incomplete`` instead of disappearing. A job this invocation refused (its folder holds another
config's result, or another job holds it) writes nothing into its folder; it leaves a note in
the sweep folder instead (:func:`record_refusal`, keyed by the invocation, so any launcher's
jobs are seen), and shows as ``refused`` with its error, never as the folder's old result.
The command's exit status follows the tally (:func:`exit_status`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from calibrate.io import results

SUMMARY_FILE = "summary.csv"
TABLES_INDEX = ".calibrate-tables.json"  # in the sweep folder: the extra tables last written
REFUSED_DIR = ".calibrate-refused"  # in the sweep folder: the jobs this invocation refused
RUN_ENV = "CALIBRATE_SWEEP_RUN"  # the invocation's id, inherited by its jobs' processes


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


def record_refusal(sweep_dir: Path, job_dir: Path, overrides: Sequence[str],
                   err: BaseException) -> Path:
    """Note in ``sweep_dir`` (never in ``job_dir``) that this invocation refused the job of
    ``job_dir``: its overrides and error, for the sweep's summary."""
    run = os.environ.get(RUN_ENV, "")
    key = hashlib.sha256(str(Path(job_dir).absolute()).encode()).hexdigest()[:16]
    return results.write_json(Path(sweep_dir) / REFUSED_DIR / f"{run}-{key}.json", {
        "run": run, "job_dir": str(Path(job_dir).absolute()), "overrides": list(overrides),
        "error": f"{type(err).__name__}: {err}"})


def refusals(sweep_dir: Path, run: str | None = None) -> dict[Path, dict[str, Any]]:
    """The jobs refused by invocation ``run`` (default: this one), by absolute folder."""
    run = os.environ.get(RUN_ENV, "") if run is None else run
    found = {}
    for path in sorted((Path(sweep_dir) / REFUSED_DIR).glob("*.json")):
        note = json.loads(path.read_text())
        if note.get("run") == run:
            found[Path(note["job_dir"])] = note
    return found


def forget_refusals(sweep_dir: Path, run: str) -> None:
    """Remove invocation ``run``'s notes (and their folder once empty)."""
    folder = Path(sweep_dir) / REFUSED_DIR
    for path in folder.glob(f"{run}-*.json"):
        path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass


def refused_row(job_dir: Path, note: Mapping[str, Any]) -> dict[str, Any]:
    """The summary row of a job this invocation refused: its own overrides and the error."""
    return {"job": job_dir.name, "overrides": " ".join(note.get("overrides") or []),
            "status": "refused", "error": note.get("error")}


def summarize_sweep(sweep_dir: Path,
                    refused: Mapping[Path, Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """Write ``summary.csv`` for a sweep directory (and the tables its jobs' studies add, e.g.
    ``steering_summary.csv``: one row per job and eta) and return it. ``refused`` (absolute job
    folder -> :func:`record_refusal`'s note): jobs shown as refused whatever their folders hold,
    and left out of the extra tables. An extra table an earlier summary wrote that no job adds
    now is removed."""
    refused = {Path(k).absolute(): v for k, v in (refused or {}).items()}
    dirs = job_dirs(sweep_dir)
    known = {d.absolute() for d in dirs}
    dirs += [d for d in refused if d not in known]
    dirs.sort(key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    rows = [row for d in dirs for row in
            ([refused_row(d, refused[d.absolute()])] if d.absolute() in refused else job_rows(d))]
    table = pd.DataFrame(rows)
    results.write_csv(Path(sweep_dir) / SUMMARY_FILE, table)
    extra: dict[str, list[dict[str, Any]]] = {}
    for d in dirs:
        if d.absolute() not in refused:
            for name, more in sweep_table_rows(d).items():
                extra.setdefault(results.safe_stem(name), []).extend(more)
    _replace_tables(Path(sweep_dir), extra)
    return table


def _replace_tables(sweep_dir: Path, tables: Mapping[str, list[dict[str, Any]]]) -> None:
    """Write each extra table; remove those an earlier summary wrote that are not among them."""
    index = sweep_dir / TABLES_INDEX
    earlier = json.loads(index.read_text()) if index.is_file() else []
    for name in earlier:
        if name not in tables and results.is_safe_stem(name):
            (sweep_dir / f"{name}.csv").unlink(missing_ok=True)
    for name, rows in tables.items():
        results.write_csv(sweep_dir / f"{name}.csv", pd.DataFrame(rows))
    results.write_json(index, sorted(tables))


def tally(table: pd.DataFrame) -> dict[str, int]:
    """Jobs by status (a steering job with several η rows counts once)."""
    if not len(table):
        return {}
    jobs = table.drop_duplicates("job")
    return {str(k): int(v) for k, v in jobs["status"].value_counts().items()}


def exit_status(counts: Mapping[str, int]) -> int:
    """The sweep command's exit status: 1 when a job failed (or did not finish), else 2 when
    a job was refused (bad input: its folder is another config's or another job's), else 0."""
    if counts.get("failed", 0) + counts.get("incomplete", 0):
        return 1
    return 2 if counts.get("refused", 0) else 0


LAST_TALLY: dict[str, int] = {}  # the last sweep's tally in this process (the CLI's exit status)


class SweepSummary(Callback):
    """Hydra callback: name the invocation when a multirun starts; gather ``summary.csv`` when
    it ends (with the jobs it refused), and end with a tally."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[RUN_ENV] = uuid.uuid4().hex
        LAST_TALLY.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        run = os.environ.get(RUN_ENV, "")
        counts = tally(summarize_sweep(sweep_dir, refusals(sweep_dir, run)))
        forget_refusals(sweep_dir, run)
        LAST_TALLY.clear()
        LAST_TALLY.update(counts)
        parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        print(f"[calibrate] sweep: {sum(counts.values())} jobs: {parts or 'none'}; "
              f"summary {sweep_dir / SUMMARY_FILE}", file=sys.stderr)
