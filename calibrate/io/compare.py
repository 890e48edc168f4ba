"""Compare finished runs: one table of all jobs, overlaid layer curves, steering and ablations.

``python -m calibrate.io.compare DIR [DIR ...] [--out OUTDIR] [--metric ece ...] [--relative-depth]``

Each DIR is a sweep directory (a multirun folder whose job sub-folders hold ``.hydra/``) or a
single job directory (``.hydra/``, ``metrics.json`` or ``error.json`` in it). Anything else
ends in one line on stderr naming the path and what is accepted, exit status 2, and nothing
written. Everything runs offline; ``--wandb-group ENTITY/PROJECT/GROUP`` adds the summaries of
an online W&B group to the table and fails with a clear message when W&B cannot be reached.

Outputs in ``--out`` (default ``./compare``), each written atomically:

* ``runs.csv`` / ``runs.md``: one row per job (sweep, job, label, overrides, status, model,
  dataset, n_examples, final-layer metrics, plateau/peak layers, steering settings, path);
* ``layers_<metric>.png``: every complete run's per-layer curve of the metric on one axis;
* with steering jobs: ``steering.csv`` (each job's final-layer row per eta, with its overrides)
  and ``eta_<metric>.png`` (final-layer metric against eta, one line per model / dataset /
  direction method, plus any other non-eta override that differs between the steering jobs);
* when steering jobs differ in ``direction.layers``: ``ablation_<metric>.png``, heat maps of the
  final-layer metric with one row per layer range and one column per eta;
* with ``nullspace.json`` files: ``nullspace.csv`` and ``nullspace_truncation.png`` (truncation
  ΔECE/ΔMCE next to the random-subspace control).

Runs are labelled by the overrides that differ between them (``.hydra/overrides.yaml``), or by
model/dataset when nothing differs; a label that still repeats gets its sweep and job appended.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import ListConfig, OmegaConf

from calibrate.io import results
from calibrate.io.summary import job_dirs, job_row

DEFAULT_OUT = "compare"
DEFAULT_METRICS = ("accuracy", "ece", "mce")
STEERING_FILE = "steering.csv"  # = calibrate.studies.steering.STEERING_FILE (which imports torch)
NULLSPACE_FILE = "nullspace.json"
PROGRESS_MIN_JOBS = 10  # a progress bar from this many jobs on
FRONT_COLUMNS = ("sweep", "job", "label", "overrides", "status", "model", "dataset", "split",
                 "n_examples")
ACCEPTED = ("a sweep directory (job sub-folders holding .hydra/, as written by "
            "`python -m calibrate.run -m`) or a job directory (holding .hydra/, metrics.json or "
            "error.json)")


class CompareError(ValueError):
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

    @property
    def complete(self) -> bool:
        return self.metrics is not None


# --- inputs -------------------------------------------------------------------------------------


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


def _legend(label: str, width: int = 60, limit: int = 180) -> str:
    """A label fit for a legend: wrapped, and shortened past ``limit`` characters."""
    text = label if len(label) <= limit else label[: limit - 1] + "…"
    return textwrap.fill(text, width, break_long_words=True, break_on_hyphens=False)


def _warn(message: str) -> None:
    print(f"[calibrate] compare: {message}", file=sys.stderr)


# --- labels -------------------------------------------------------------------------------------


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


# --- tables -------------------------------------------------------------------------------------


INT_COLUMNS = ("n_examples", "plateau_layer", "peak_ece_layer", "num_layers")


def runs_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The combined table, the identifying columns first and ``path`` last; counts and layers
    stay integers where failed jobs leave them empty."""
    table = pd.DataFrame(list(rows))
    for column in INT_COLUMNS:
        if column in table.columns:
            values = pd.to_numeric(table[column], errors="coerce")
            if values.dropna().eq(values.dropna().round()).all():
                table[column] = values.round().astype("Int64")
    front = [c for c in FRONT_COLUMNS if c in table.columns]
    back = [c for c in ("error", "path") if c in table.columns]
    middle = [c for c in table.columns if c not in front and c not in back]
    return table[front + middle + back]


def _cell(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(table: pd.DataFrame) -> str:
    """A pipe table: pandas ``to_markdown`` when ``tabulate`` is installed, else hand-written."""
    try:
        import tabulate  # noqa: F401
    except ImportError:
        header = "| " + " | ".join(_cell(c) for c in table.columns) + " |"
        rule = "| " + " | ".join("---" for _ in table.columns) + " |"
        lines = ["| " + " | ".join(_cell(v) for v in row) + " |"
                 for row in table.itertuples(index=False, name=None)]
        return "\n".join([header, rule, *lines]) + "\n"
    rows = [[_md_value(v) for v in row] for row in table.itertuples(index=False, name=None)]
    cells = pd.DataFrame(rows, columns=list(table.columns), dtype=object)
    return cells.to_markdown(index=False, floatfmt=".4f", missingval="") + "\n"


def _md_value(value: Any) -> Any:
    """A cell for tabulate: missing -> None (blank), text with its pipes escaped."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value.replace("|", "\\|").replace("\n", " ")
    return value.item() if isinstance(value, np.generic) else value


def _run_info(run: Run) -> dict[str, Any]:
    return {"sweep": run.sweep, "job": run.job_dir.name, "label": run.label,
            "overrides": " ".join(run.overrides), "model": run.row.get("model"),
            "dataset": run.row.get("dataset"), "direction_method": run.row.get("direction_method"),
            "direction_layers": run.row.get("direction_layers")}


def final_steering_rows(run: Run) -> pd.DataFrame | None:
    """The job's final-layer steering rows (one per eta), from steering.csv or metrics.json."""
    if not run.complete:
        return None
    path = run.job_dir / STEERING_FILE
    table = None
    if path.is_file():
        try:
            full = pd.read_csv(path)
            table = full[full["layer"] == full["layer"].max()].copy()
        except (OSError, ValueError, KeyError) as err:
            _warn(f"{path}: cannot read the steering table ({err}); using metrics.json")
    if table is None and isinstance(run.metrics.get("steering"), Mapping):
        rows = [{"eta": float(eta), **values} for eta, values in run.metrics["steering"].items()]
        table = pd.DataFrame(rows)
        if run.metrics.get("num_layers"):
            table.insert(1, "layer", int(run.metrics["num_layers"]) - 1)
    if table is None or table.empty:
        return None
    info = _run_info(run)
    for k, (key, value) in enumerate(info.items()):
        table.insert(k, key, value)
    return table.sort_values("eta").reset_index(drop=True)


def _group_names(runs: Sequence[Run], drop: Sequence[str] = ()) -> dict[Path, str]:
    """Per run: model/dataset/method plus the other overrides (not eta, not the ``drop`` keys)
    that differ between the runs."""
    fixed = {"eta", *IDENTITY_KEYS, "direction.method", *drop}
    varying = _varying([[o for o in r.overrides if _key(o) not in fixed] for r in runs])
    names = {}
    for run, extra in zip(runs, varying):
        base = "/".join(str(x) for x in (run.row.get("model"), run.row.get("dataset"),
                                         run.row.get("direction_method")) if x)
        names[run.job_dir] = " ".join([base, *extra]).strip()
    return names


# --- nullspace ----------------------------------------------------------------------------------


def _number(value: Any) -> tuple[float, float | None] | None:
    """A number, or the mean and standard deviation of a list of numbers (None otherwise)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value), None
    if isinstance(value, Sequence) and not isinstance(value, str) and value:
        numbers = [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) == len(value):
            arr = np.asarray(numbers, float)
            return float(arr.mean()), float(arr.std()) if len(arr) > 1 else None
    if isinstance(value, Mapping):
        for key in ("mean", "value"):
            if key in value:
                found = _number(value[key])
                if found is not None:
                    std = value.get("std")
                    return found[0], float(std) if isinstance(std, (int, float)) else found[1]
    return None


def _lookup(data: Mapping[str, Any],
            places: Sequence[tuple[str, ...]]) -> tuple[float, float | None] | None:
    for place in places:
        node: Any = data
        for key in place:
            node = node.get(key) if isinstance(node, Mapping) else None
        found = _number(node) if node is not None else None
        if found is not None:
            return found
    return None


def _list_of(data: Any, key: str, field_name: str) -> Any:
    node = data.get(key) if isinstance(data, Mapping) else None
    if isinstance(node, Sequence) and node and all(isinstance(x, Mapping) for x in node):
        return [x.get(field_name) for x in node]
    return None


def nullspace_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """The comparable figures of one nullspace.json, found wherever they sit.

    Scalars at the top level are kept as they are; the truncation deltas are looked up as
    ``delta_<m>`` at the top level or under ``truncation``, the random-subspace control as
    ``random_delta_<m>`` at the top level or under ``truncation``/``random_control``, or
    ``delta_<m>`` under ``random_control`` (a number, a list of numbers, a list of objects, or
    ``{mean, std}``; lists give ``random_delta_<m>_std``).
    """
    out: dict[str, Any] = {k: v for k, v in data.items()
                           if isinstance(v, (int, float, str, bool)) or v is None}
    for metric in ("ece", "mce", "accuracy"):
        own = _lookup(data, [(f"delta_{metric}",), (f"truncation_delta_{metric}",),
                             ("truncation", f"delta_{metric}")])
        rand = _lookup(data, [(f"random_delta_{metric}",), ("truncation", f"random_delta_{metric}"),
                              ("random_control", f"delta_{metric}"),
                              ("random_control", f"random_delta_{metric}")])
        if rand is None:
            listed = _list_of(data, "random_control", f"delta_{metric}")
            rand = _number(listed) if listed is not None else None
        if own is not None:
            out[f"delta_{metric}"] = own[0]
        if rand is not None:
            out[f"random_delta_{metric}"] = rand[0]
            if rand[1] is not None:
                out[f"random_delta_{metric}_std"] = rand[1]
    return out


def nullspace_rows(run: Run) -> list[dict[str, Any]]:
    """Rows of the run's nullspace.json (an object, or a list of objects, e.g. one per k)."""
    path = run.job_dir / NULLSPACE_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        _warn(f"{path}: cannot read ({err}); left out of nullspace.csv")
        return []
    items = data if isinstance(data, list) else [data]
    info = {k: v for k, v in _run_info(run).items() if not k.startswith("direction_")}
    return [{**info, **nullspace_fields(item)} for item in items if isinstance(item, Mapping)]


# --- W&B ----------------------------------------------------------------------------------------


def wandb_rows(group_path: str) -> list[dict[str, Any]]:
    """Summary rows of the runs of an online W&B group ``ENTITY/PROJECT/GROUP``."""
    parts = group_path.split("/")
    if len(parts) != 3 or not all(parts):
        raise CompareError(f"--wandb-group={group_path!r}; accepted: ENTITY/PROJECT/GROUP")
    entity, project, group = parts
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        raise CompareError(f"--wandb-group={group_path}: W&B is {mode} (WANDB_MODE={mode}); an "
                           "online group needs network access and a W&B login. Everything else "
                           "works offline: drop --wandb-group")
    try:
        import wandb

        api = wandb.Api(timeout=20)
        runs = list(api.runs(f"{entity}/{project}", filters={"group": group}))
    except Exception as err:  # noqa: BLE001 - no network, no login, no such project: one message
        raise CompareError(f"--wandb-group={group_path}: cannot fetch the group from W&B "
                           f"({type(err).__name__}: {err}); are you online and logged in "
                           "(`wandb login`)? Everything else works offline: drop --wandb-group") \
            from None
    if not runs:
        raise CompareError(f"--wandb-group={group_path}: the group has no runs")
    rows = []
    for wrun in runs:
        summary = dict(getattr(wrun, "summary", {}) or {})
        config = dict(getattr(wrun, "config", {}) or {})

        def name_of(key: str) -> Any:
            value = config.get(key)
            return value.get("name") if isinstance(value, Mapping) else value

        row: dict[str, Any] = {
            "sweep": f"wandb:{group_path}", "job": getattr(wrun, "name", ""),
            "label": getattr(wrun, "name", ""), "overrides": "",
            "status": "complete" if getattr(wrun, "state", "") == "finished"
            else str(getattr(wrun, "state", "unknown")),
            "model": name_of("model"), "dataset": name_of("dataset"),
            "n_examples": summary.get("n_examples"),
        }
        row.update({k[len("final/"):]: v for k, v in summary.items()
                    if k.startswith("final/") and isinstance(v, (int, float))})
        for key in ("plateau_layer", "peak_ece_layer", "peak_ece"):
            row[key] = summary.get(key)
        row["path"] = getattr(wrun, "url", "")
        rows.append(row)
    return rows


# --- the comparison -----------------------------------------------------------------------------


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out}: exists and is not a directory")


def _read_all(jobs: Sequence[tuple[str, Path]]) -> list[Run]:
    from tqdm.auto import tqdm

    return [read_run(sweep, job) for sweep, job in
            tqdm(jobs, desc="reading jobs", unit="job", disable=len(jobs) < PROGRESS_MIN_JOBS)]


def _without_eta(label: str) -> str:
    return " ".join(p for p in label.split() if _key(p) != "eta")


def layer_curves(runs: Sequence[Run]) -> dict[str, pd.DataFrame]:
    """Per-layer tables to overlay, by legend label. A steering job's layers.csv is its
    *unsteered* evaluation split: it is labelled ``(unsteered)``, never with an η, and shown once
    for all jobs that share it; its steered curves (steering.csv) are labelled with their η."""
    tables: dict[str, pd.DataFrame] = {}
    for run in runs:
        if run.layers is None or "layer" not in run.layers:
            continue
        if not (run.metrics or {}).get("steering"):
            tables[_legend(run.label)] = run.layers
            continue
        base = _without_eta(run.label) or _model_dataset(run.row) or run.job_dir.name
        tables.setdefault(_legend(f"{base} (unsteered)"), run.layers)
        path = run.job_dir / "steering.csv"
        steering = pd.read_csv(path) if path.is_file() else None
        for eta in [] if steering is None else sorted(steering["eta"].unique()):
            if float(eta) != 0.0:
                part = steering[steering["eta"] == eta].drop(columns="eta")
                tables.setdefault(_legend(f"{base} eta={float(eta):g}"), part)
    return tables


def _layer_plots(runs: Sequence[Run], out: Path, metrics: Sequence[str],
                 relative_depth: bool) -> list[Path]:
    from calibrate.io.plots import plot_overlay

    tables = layer_curves(runs)
    if not tables:
        return []
    depths = {int(t["layer"].max()) for t in tables.values()}
    if len(depths) > 1 and not relative_depth:
        _warn(f"the runs have different depths ({', '.join(map(str, sorted(depths)))} layers); "
              "--relative-depth puts them on one 0..1 axis")
    written = []
    for metric in metrics:
        having = {name: t for name, t in tables.items() if metric in t.columns}
        if not having:
            _warn(f"no layer table has the metric {metric!r}; no layers_{metric}.png")
            continue
        where = "relative depth" if relative_depth else "layer"
        written.append(plot_overlay(having, metric, out / f"layers_{metric}.png",
                                    f"{metric} per {where} ({len(having)} runs)", relative_depth))
    return written


def _steering_outputs(runs: Sequence[Run], out: Path, metrics: Sequence[str]) -> list[Path]:
    from calibrate.io.plots import plot_eta_lines, plot_heatmaps

    steered = [(r, t) for r in runs if (t := final_steering_rows(r)) is not None]
    if not steered:
        return []
    table = pd.concat([t for _, t in steered], ignore_index=True)
    written = [results.write_csv(out / STEERING_FILE, table)]
    names = {k: _legend(v) for k, v in _group_names([r for r, _ in steered]).items()}
    table["line"] = [names[r.job_dir] for r, t in steered for _ in range(len(t))]
    for metric in metrics:
        if metric not in table.columns:
            continue
        lines = {name: part for name, part in table.groupby("line", sort=True)}
        written.append(plot_eta_lines(lines, metric, out / f"eta_{metric}.png",
                                      f"final-layer {metric} against eta"))
    # the layer-range ablation: panels (model/dataset/method/other overrides) with several ranges
    panel_names = {k: _legend(v, width=45) for k, v in
                   _group_names([r for r, _ in steered], drop=("direction.layers",)).items()}
    table["panel"] = [panel_names[r.job_dir] for r, t in steered for _ in range(len(t))]
    table["direction_layers"] = table["direction_layers"].fillna("none").astype(str)
    ablated = [name for name, part in table.groupby("panel", sort=True)
               if part["direction_layers"].nunique() > 1]
    for metric in metrics if ablated else ():
        if metric not in table.columns:
            continue
        panels = {}
        for name in ablated:
            part = table[table["panel"] == name]
            grid = part.pivot_table(index="direction_layers", columns="eta", values=metric,
                                    aggfunc="mean")
            panels[name] = grid.loc[sorted(grid.index, key=_range_key)]
        written.append(plot_heatmaps(panels, out / f"ablation_{metric}.png",
                                     f"final-layer {metric}: direction.layers x eta",
                                     f"final-layer {metric}"))
    return written


def _nullspace_outputs(runs: Sequence[Run], out: Path) -> list[Path]:
    from calibrate.io.plots import plot_grouped_bars

    rows = [row for r in runs for row in nullspace_rows(r)]
    if not rows:
        return []
    table = pd.DataFrame(rows)
    written = [results.write_csv(out / "nullspace.csv", table)]
    panels = {}
    for metric in ("ece", "mce"):
        series = {"truncation": f"delta_{metric}", "random subspace": f"random_delta_{metric}"}
        if any(c in table.columns for c in series.values()):
            panels[f"Δ{metric.upper()}"] = series
    if panels:
        bars = table.copy()
        ks = bars["k"] if "k" in bars.columns else pd.Series([None] * len(bars), index=bars.index)
        repeated = bars["label"].duplicated(keep=False)
        bars.index = [_legend(f"{lab} k={k}" if again and pd.notna(k) else str(lab), width=30)
                      for lab, k, again in zip(bars["label"], ks, repeated)]
        errors = {f"random_delta_{m}": f"random_delta_{m}_std" for m in ("ece", "mce")}
        written.append(plot_grouped_bars(bars, panels, out / "nullspace_truncation.png",
                                         "null-space truncation against the random-subspace "
                                         "control", errors))
    else:
        _warn("nullspace.json files hold no truncation deltas; nullspace.csv only")
    return written


def compare(
    dirs: Sequence[str | Path],
    out: str | Path = DEFAULT_OUT,
    metrics: Sequence[str] = DEFAULT_METRICS,
    relative_depth: bool = False,
    wandb_group: str | None = None,
) -> pd.DataFrame:
    """Compare the jobs under ``dirs`` and write the tables and plots to ``out``.

    Args:
        dirs: sweep directories and/or single job directories.
        out: output folder (created).
        metrics: per-layer metrics to overlay (and, for steering jobs, to plot against eta).
        relative_depth: x axis layer / last layer, for models of different depth.
        wandb_group: ``ENTITY/PROJECT/GROUP`` of an online W&B group to add to the table.

    Returns:
        The runs table (as in ``runs.csv``); ``.attrs["outputs"]`` lists the written files.

    Raises:
        CompareError: a path is neither a sweep nor a job directory, ``out`` is a file, or the
            W&B group cannot be fetched. Nothing is written then.
    """
    out = Path(out)
    metrics = list(dict.fromkeys(metrics)) or list(DEFAULT_METRICS)
    jobs = resolve_inputs(dirs)
    _check_out(out)
    extra_rows = wandb_rows(wandb_group) if wandb_group else []
    runs = _read_all(jobs)
    assign_labels(runs)
    table = runs_table([r.row for r in runs] + extra_rows)
    out.mkdir(parents=True, exist_ok=True)
    written = [results.write_csv(out / "runs.csv", table)]
    n_done = int((table["status"] == "complete").sum()) if len(table) else 0
    md = (f"# calibrate comparison\n\n{len(table)} runs ({n_done} complete) from "
          f"{', '.join(str(d) for d in dirs)}"
          f"{' and W&B group ' + wandb_group if wandb_group else ''}.\n\n" + markdown_table(table))
    written.append(results.write_text(out / "runs.md", md))
    written += _layer_plots(runs, out, metrics, relative_depth)
    written += _steering_outputs(runs, out, metrics)
    written += _nullspace_outputs(runs, out)
    table.attrs["outputs"] = [str(p) for p in written]
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m calibrate.io.compare",
        description="Compare calibrate runs: one table of all jobs, overlaid per-layer curves, "
                    "steering curves, layer-range ablations and null-space controls.")
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="sweep directory (multirun) or single job directory")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: ./compare)")
    parser.add_argument("--metric", nargs="+", action="extend", dest="metrics", default=None,
                        metavar="METRIC",
                        help="per-layer metrics to plot (default: accuracy ece mce)")
    parser.add_argument("--relative-depth", action="store_true",
                        help="x axis layer / last layer, for models of different depth")
    parser.add_argument("--wandb-group", default=None, metavar="ENTITY/PROJECT/GROUP",
                        help="also add the summaries of an online W&B group (needs network)")
    args = parser.parse_args(argv)
    try:
        table = compare(args.dirs, args.out, args.metrics or DEFAULT_METRICS, args.relative_depth,
                        args.wandb_group)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    outputs = table.attrs.get("outputs", [])
    n_done = int((table["status"] == "complete").sum()) if len(table) else 0
    print(f"[calibrate] compared {len(table)} runs ({n_done} complete); outputs in "
          f"{Path(args.out).resolve()}:")
    for path in outputs:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
