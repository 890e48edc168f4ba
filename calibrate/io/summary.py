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
STEERING_SUMMARY_FILE = "steering_summary.csv"
REFUSED_DIR = ".calibrate-refused"  # in the sweep folder: the jobs this invocation refused
RUN_ENV = "CALIBRATE_SWEEP_RUN"  # the invocation's id, inherited by its jobs' processes


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
    """Write ``summary.csv`` for a sweep directory (and, when jobs steered,
    ``steering_summary.csv``: one row per job and eta, e.g. layer range x eta) and return it.
    ``refused`` (absolute job folder -> :func:`record_refusal`'s note): jobs shown as refused
    whatever their folders hold."""
    refused = {Path(k).absolute(): v for k, v in (refused or {}).items()}
    dirs = job_dirs(sweep_dir)
    known = {d.absolute() for d in dirs}
    dirs += [d for d in refused if d not in known]
    dirs.sort(key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    rows = [row for d in dirs for row in
            ([refused_row(d, refused[d.absolute()])] if d.absolute() in refused else job_rows(d))]
    table = pd.DataFrame(rows)
    results.write_csv(Path(sweep_dir) / SUMMARY_FILE, table)
    steering = [row for d in dirs if d.absolute() not in refused for row in steering_rows(d)]
    if steering:
        results.write_csv(Path(sweep_dir) / STEERING_SUMMARY_FILE, pd.DataFrame(steering))
    else:  # an earlier summary's steering rows are not this one's
        (Path(sweep_dir) / STEERING_SUMMARY_FILE).unlink(missing_ok=True)
    return table


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
