"""The plots of the combined runs: overlaid layer curves, steering against eta, layer-range
ablations and the null-space truncation control (with the steering and null-space tables)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from calibrate.io import results
from calibrate.io.compare.nullspace_json import nullspace_rows
from calibrate.io.compare.runs import STEERING_FILE, Run, _key, _model_dataset, _range_key, _warn
from calibrate.io.compare.tables import _group_names, final_steering_rows


def _legend(label: str, width: int = 60, limit: int = 180) -> str:
    """A label fit for a legend: wrapped, and shortened past ``limit`` characters."""
    text = label if len(label) <= limit else label[: limit - 1] + "…"
    return textwrap.fill(text, width, break_long_words=True, break_on_hyphens=False)


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
