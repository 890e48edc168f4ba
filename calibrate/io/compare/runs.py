"""Reading the runs to compare: which job directories the inputs name, what each job holds,
and the labels that tell the runs apart."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import ListConfig, OmegaConf

from calibrate.errors import UserError
from calibrate.io import results
from calibrate.io.summary import job_dirs, job_row

STEERING_FILE = "steering.csv"  # = calibrate.studies.steering.STEERING_FILE (which imports torch)
NULLSPACE_FILE = "nullspace.json"
ACCEPTED = ("a sweep directory (job sub-folders holding .hydra/, as written by "
            "`python -m calibrate.run -m`) or a job directory (holding .hydra/, metrics.json or "
            "error.json)")


class CompareError(UserError):
    """The inputs cannot be compared (bad path, unreachable W&B group, bad output folder)."""


@dataclass
class Run:
    """One job directory and what was read from it."""

    sweep: str
    job_dir: Path
    overrides: list[str]
    row: dict[str, Any]
    metrics: dict[str, Any] | None
    label: str = ""
    layers: pd.DataFrame | None = None
    _tables: dict[str, pd.DataFrame | None] = field(default_factory=dict, repr=False)

    @property
    def complete(self) -> bool:
        return self.metrics is not None

    @property
    def steering(self) -> bool:
        """Whether the job steered (its layers.csv is then the unsteered evaluation split)."""
        return bool((self.metrics or {}).get("steering"))

    def table(self, name: str) -> pd.DataFrame | None:
        """A CSV of the complete job (``steering.csv``, ``null.csv``, ``baselines.csv`` …), read
        once; None when missing or unreadable (with a warning)."""
        if not self.complete:
            return None
        if name not in self._tables:
            path = self.job_dir / name
            found = None
            if path.is_file():
                try:
                    found = pd.read_csv(path)
                except (OSError, ValueError) as err:
                    _warn(f"{path}: cannot read ({err}); left out")
            self._tables[name] = found
        return self._tables[name]


def _warn(message: str) -> None:
    print(f"[calibrate] compare: {message}", file=sys.stderr)


# --- inputs --------------------------------------------------------------------------------------


def _is_job_dir(path: Path) -> bool:
    return (path / ".hydra").is_dir() or (path / results.METRICS_FILE).is_file() or \
        (path / results.ERROR_FILE).is_file()


def resolve_inputs(dirs: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(sweep label, job directory) for every job under ``dirs``; CompareError on a bad path.

    A sweep's label is the path as given; a single job directory has an empty sweep label.
    A job reached twice (its sweep and itself) is listed once.
    """
    if not dirs:
        raise CompareError(f"no directory given; accepted: {ACCEPTED}")
    found: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for given in dirs:
        path = Path(given)
        if not path.exists():
            raise CompareError(f"{given}: no such directory; accepted: {ACCEPTED}")
        if not path.is_dir():
            raise CompareError(f"{given}: not a directory; accepted: {ACCEPTED}")
        if _is_job_dir(path):
            jobs, sweep = [path], ""
        else:
            jobs, sweep = job_dirs(path), str(given)
            if not jobs:
                raise CompareError(f"{given}: neither a sweep nor a job directory (no job folders "
                                   f"with .hydra/, no metrics.json); accepted: {ACCEPTED}")
        for job in jobs:
            key = job.resolve()
            if key not in seen:
                seen.add(key)
                found.append((sweep, job))
    return found


def read_overrides(job_dir: Path) -> list[str]:
    """The job's Hydra overrides (``.hydra/overrides.yaml``, a YAML list of strings)."""
    path = Path(job_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        data = OmegaConf.load(path)
    except Exception:  # noqa: BLE001 - an unreadable file means no overrides, not a crash
        return []
    return [str(o) for o in data] if isinstance(data, ListConfig) else []


def layer_range(layers: Any) -> str:
    """``[28, 29, 30]`` -> ``"28-30"``; non-contiguous ``[3, 7]`` -> ``"3,7"``; ``"auto"`` kept."""
    if layers is None:
        return ""
    if isinstance(layers, str):
        return layers
    try:
        values = [int(x) for x in layers]
    except (TypeError, ValueError):
        return str(layers)
    if not values:
        return ""
    if len(values) > 1 and values == list(range(values[0], values[0] + len(values))):
        return f"{values[0]}-{values[-1]}"
    return ",".join(str(v) for v in values)


def _range_key(text: str) -> tuple:
    numbers = [int(p) for p in text.replace("-", ",").split(",") if p.strip().isdigit()]
    return (0, numbers, text) if numbers else (1, [], text)


def _steering_fields(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    if not metrics:
        return {}
    out: dict[str, Any] = {"num_layers": metrics.get("num_layers")}
    if metrics.get("intervention") or metrics.get("steering"):
        direction = metrics.get("direction") or {}
        out.update(intervention=metrics.get("intervention"),
                   direction_method=direction.get("method"),
                   direction_layers=layer_range(direction.get("layers")) or "none",
                   etas=" ".join(f"{float(e):g}" for e in metrics.get("etas") or []))
    return out


def read_run(sweep: str, job_dir: Path) -> Run:
    """Read one job directory (its summary row, metrics.json and layers.csv)."""
    try:
        row = {"sweep": sweep, **job_row(job_dir)}
    except Exception as err:  # noqa: BLE001 - a corrupt error.json or overrides.yaml: one row
        _warn(f"{job_dir}: cannot read ({type(err).__name__}: {err})")
        row = {"sweep": sweep, "job": job_dir.name, "overrides": " ".join(read_overrides(job_dir)),
               "status": "unreadable", "error": f"{type(err).__name__}: {err}"}
    metrics = results.read_metrics(job_dir) if row["status"] == "complete" else None
    if metrics is not None:
        row["split"] = metrics.get("split")
    row.update(_steering_fields(metrics))
    row["path"] = str(job_dir)
    run = Run(sweep, job_dir, read_overrides(job_dir), row, metrics)
    if metrics is not None:
        path = job_dir / results.LAYERS_FILE
        try:
            run.layers = pd.read_csv(path)
        except (OSError, ValueError) as err:
            _warn(f"{path}: cannot read the layer table ({err}); left out of the layer plots")
    return run


# --- labels --------------------------------------------------------------------------------------


def _varying(lists: Sequence[Sequence[str]]) -> list[list[str]]:
    """Each list without the items that every list holds."""
    if len(lists) < 2:
        return [list(x) for x in lists]
    common = set(lists[0]).intersection(*map(set, lists[1:]))
    return [[o for o in x if o not in common] for x in lists]


IDENTITY_KEYS = ("model", "model.name", "dataset", "dataset.name")


def _key(override: str) -> str:
    """The config key an override sets (``++metrics.bootstrap=0`` -> ``metrics.bootstrap``)."""
    return override.split("=", 1)[0].lstrip("+~")


def _model_dataset(row: Mapping[str, Any]) -> str:
    model, dataset = row.get("model"), row.get("dataset")
    parts = [str(x) for x in (model, dataset) if isinstance(x, str) and x]
    return "/".join(parts)


def assign_labels(runs: Sequence[Run]) -> None:
    """Label each run by its differing overrides (or model/dataset); labels end up unique."""
    if len(runs) == 1:
        run = runs[0]
        run.label = " ".join(run.overrides) or _model_dataset(run.row) or run.job_dir.name
    else:
        pairs = {_model_dataset(r.row) for r in runs if r.complete}
        for run, varying in zip(runs, _varying([r.overrides for r in runs])):
            parts = []
            if len(pairs) > 1 and not any(_key(o) in IDENTITY_KEYS for o in varying):
                parts.append(_model_dataset(run.row))
            parts += varying
            run.label = (" ".join(p for p in parts if p) or _model_dataset(run.row)
                         or run.job_dir.name)
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1:
            parent = Path(run.sweep).name if run.sweep else run.job_dir.parent.name
            where = "/".join(p for p in (parent, run.job_dir.name) if p)
            run.label = f"{run.label} ({where})"
    for run in runs:
        run.row["label"] = run.label
