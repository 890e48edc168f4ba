"""The comparison figures as small multiples: per-layer curves and steering against η in one
panel per model × dataset (η: and per η unit), coloured by what varies between the runs, with
their intervals and references; layer-range heat maps with significance marks; the null-space
truncation against its random control.

Each builder returns a ``Figure`` (or None when the runs hold nothing to draw);
:func:`comparison_figures` gives them all by file name. Saving is the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from calibrate.io import plotstyle as ps
from calibrate.io.compare.facets import (
    NO_LABEL,
    STEERING_KEYS,
    eta_axis,
    eta_unit,
    facet_labels,
    group,
    model_dataset,
    palette,
    study_labels,
)
from calibrate.io.compare.runs import Run, _warn
from calibrate.io.compare.tables import final_steering_rows

BASELINES_FILE, NULL_FILE = "baselines.csv", "null.csv"


@dataclass
class Curve:
    """One line of a panel: its colour label, the run it comes from and its x / y values."""

    label: str
    run: Run
    x: np.ndarray
    y: np.ndarray
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    significant: np.ndarray | None = None  # per point; hollow markers where False


def _column(table: pd.DataFrame, name: str) -> np.ndarray | None:
    return table[name].to_numpy(float) if name in table.columns else None


def _legend(fig: Figure, colour: dict[str, object], styles: Sequence[tuple]) -> None:
    """Colour entries (when more than one colour) and style entries (bands, references)."""
    handles, labels = [], []
    if len(colour) > 1 or NO_LABEL not in colour:
        for label, c in colour.items():
            handles.append(Line2D([], [], color=c, marker="o", ms=3))
            labels.append(label)
    for handle, label in styles:
        handles.append(handle)
        labels.append(label)
    ps.outside_legend(fig, handles, labels)


def _legend_labels(colour: dict[str, object], styles: Sequence[tuple]) -> list[str]:
    shown = list(colour)[: ps.MAX_ENTRIES] if (len(colour) > 1 or NO_LABEL not in colour) else []
    return [ps.short_label(t) for t in [*shown, *(s[1] for s in styles)]]


# --- per-layer curves ------------------------------------------------------------------------------


def layer_lines(runs: Sequence[Run], metric: str) -> dict[str, list[Curve]]:
    """Per model × dataset panel, the per-layer curves of ``metric`` (bootstrap band where the
    table has ``<metric>_lo/hi``). A steering job's layers.csv is its *unsteered* evaluation
    split: labelled without its steering overrides and drawn once for the jobs that share it."""
    having = [r for r in runs if r.layers is not None and {"layer", metric} <= set(r.layers)]
    plain = study_labels([r for r in having if not r.steering])
    steered = study_labels([r for r in having if r.steering], STEERING_KEYS)
    panels: dict[str, list[Curve]] = {}
    for panel, members in group(having, model_dataset).items():
        seen: dict[tuple, str] = {}
        for run in members:
            table = run.layers.sort_values("layer")
            label = (steered if run.steering else plain)[run.job_dir]
            if run.steering:
                label = f"{label} (unsteered)"
            content = (label, tuple(np.round(table[metric].to_numpy(float), 12)))
            if content in seen:
                continue
            if label in seen.values():
                label = f"{label} ({run.job_dir.parent.name}/{run.job_dir.name})"
            seen[content] = label
            panels.setdefault(panel, []).append(Curve(
                label, run, table["layer"].to_numpy(float), table[metric].to_numpy(float),
                _column(table, f"{metric}_lo"), _column(table, f"{metric}_hi")))
    return panels


def _temperature(run: Run, metric: str) -> pd.DataFrame | None:
    table = run.table(BASELINES_FILE)
    if table is None or "method" not in table.columns or metric not in table.columns:
        return None
    rows = table[table["method"] == "temperature"].sort_values("layer")
    return rows if len(rows) else None


def layer_figure(runs: Sequence[Run], metric: str, relative_depth: bool = False) -> Figure | None:
    """``metric`` against layer, one panel per model × dataset (x: the model's own layer
    numbering, or layer / last layer with ``relative_depth``); bootstrap bands, the chance line
    (accuracy) and the temperature-scaling baseline (dashed) where the runs have them."""
    panels = layer_lines(runs, metric)
    if not panels:
        return None
    colour = palette(c.label for curves in panels.values() for c in curves)
    styles = []
    if any(c.lo is not None for cs in panels.values() for c in cs):
        styles.append((Patch(color="grey", alpha=0.25), "bootstrap interval"))
    fig, axes = ps.facet_figure(len(panels), _legend_labels(colour, styles + [(0, "x" * 22)]))
    has_temp = False
    for ax, (panel, curves) in zip(axes, panels.items()):
        values = []
        for curve in curves:
            scale = max(curve.x.max(), 1.0) if relative_depth else 1.0
            c = colour[curve.label]
            ax.plot(curve.x / scale, curve.y, "o-", ms=2, lw=1.2, color=c)
            values += list(curve.y)
            if curve.lo is not None and curve.hi is not None:
                ax.fill_between(curve.x / scale, curve.lo, curve.hi, color=c, alpha=0.18, lw=0)
                values += list(curve.lo) + list(curve.hi)
            temp = _temperature(curve.run, metric)
            if temp is not None:
                has_temp = True
                x = temp["layer"].to_numpy(float) / scale
                ax.plot(x, temp[metric], "--", lw=1, color=c)
                values += list(temp[metric])
        chance = (curves[0].run.metrics or {}).get("chance_accuracy")
        if metric == "accuracy" and isinstance(chance, (int, float)):
            ax.axhline(chance, color="k", ls=":", lw=1)
            values.append(chance)
        ps.y_range(ax, values, bounds=ps.metric_bounds(metric))
        ps.style_axes(ax, "relative depth" if relative_depth else "layer", metric, panel)
    if has_temp:
        styles.append((Line2D([], [], color="grey", ls="--"), "temperature scaling"))
    if metric == "accuracy":
        styles.append((Line2D([], [], color="k", ls=":"), "chance"))
    _legend(fig, colour, styles)
    fig.suptitle(ps.plain(f"{metric} per layer ({sum(map(len, panels.values()))} curves)"),
                 fontsize=10)
    return fig


# --- steering against eta --------------------------------------------------------------------------


def _delta(rows: pd.DataFrame, metric: str) -> np.ndarray:
    if f"delta_{metric}" in rows.columns:
        return rows[f"delta_{metric}"].to_numpy(float)
    values = rows[metric].to_numpy(float)
    ref = rows.loc[rows["eta"] == 0.0, metric]
    return values - (float(ref.iloc[0]) if len(ref) else np.nan)


def eta_lines(runs: Sequence[Run], metric: str) -> dict[tuple[str, str], list[Curve]]:
    """Per (model × dataset, η unit) panel, each steering job's final-layer Δ``metric`` against
    η with its paired interval (``delta_<metric>_lo/hi``) where the job has it."""
    steered = [(r, t) for r in runs if r.steering and (t := final_steering_rows(r)) is not None
               and metric in t.columns]
    labels = facet_labels([r for r, _ in steered], ("eta", "intervention.eta_scale"))
    panels: dict[tuple[str, str], list[Curve]] = {}
    for run, rows in steered:
        sig = rows[f"significant_{metric}"].fillna(False).astype(bool).to_numpy() \
            if f"significant_{metric}" in rows.columns else None
        curve = Curve(labels[run.job_dir], run, rows["eta"].to_numpy(float), _delta(rows, metric),
                      _column(rows, f"delta_{metric}_lo"), _column(rows, f"delta_{metric}_hi"),
                      sig)
        panels.setdefault((model_dataset(run), eta_unit(run)), []).append(curve)
    return dict(sorted(panels.items()))


def _null_band(ax, run: Run, metric: str, drawn: set) -> list[float]:
    """Draw the run's random-direction null band (0 at η = 0) unless the panel has an identical
    one; the values drawn."""
    null = run.table(NULL_FILE)
    lo, hi = f"null_delta_{metric}_p05", f"null_delta_{metric}_p95"
    if null is None or not {"eta", lo, hi} <= set(null.columns):
        return []
    band = np.vstack([[0.0, 0.0, 0.0], null[["eta", lo, hi]].to_numpy(float)])
    band = band[np.argsort(band[:, 0], kind="stable")]
    key = tuple(np.round(band, 9).ravel())
    if key not in drawn:
        drawn.add(key)
        ax.fill_between(band[:, 0], band[:, 1], band[:, 2], color="grey", alpha=0.2, lw=0)
    return list(band[:, 1]) + list(band[:, 2])


def _temperature_delta(run: Run, metric: str) -> float | None:
    temp = _temperature(run, metric)
    if temp is None or f"{metric}_before" not in temp.columns:
        return None
    last = temp.iloc[-1]
    return float(last[metric] - last[f"{metric}_before"])


def eta_figure(runs: Sequence[Run], metric: str) -> Figure | None:
    """Final-layer Δ``metric`` (against η = 0) against η, one panel per model × dataset × η
    unit, never two units on one axis; paired-interval bands, the random-direction null's
    5–95 % band (grey) and the temperature-scaling baseline (dashed) as references."""
    panels = eta_lines(runs, metric)
    if not panels:
        return None
    colour = palette(c.label for cs in panels.values() for c in cs)
    styles = [(Patch(color="tab:blue", alpha=0.25), "paired 95 % interval"),
              (Patch(color="grey", alpha=0.3), "random directions 5–95 %"),
              (Line2D([], [], color="k", marker="o", mfc="white", ls="none"),
               "interval includes 0"),
              (Line2D([], [], color="k", ls="--"), "temperature scaling")]
    fig, axes = ps.facet_figure(len(panels), _legend_labels(colour, styles))
    for ax, ((panel, unit), curves) in zip(axes, panels.items()):
        values, temps, nulls = [0.0], set(), set()
        alpha = 0.18 if len(curves) <= 3 else 0.08
        for curve in curves:
            c = colour[curve.label]
            order = np.argsort(curve.x)
            ax.plot(curve.x[order], curve.y[order], "-", lw=1.2, color=c)
            filled = np.ones(len(order), bool) if curve.significant is None else \
                curve.significant[order] | (curve.x[order] == 0)
            ax.plot(curve.x[order][filled], curve.y[order][filled], "o", ms=3.5, color=c)
            ax.plot(curve.x[order][~filled], curve.y[order][~filled], "o", ms=3.5, color=c,
                    mfc="white")
            values += list(curve.y)
            if curve.lo is not None and curve.hi is not None:
                ax.fill_between(curve.x[order], curve.lo[order], curve.hi[order], color=c,
                                alpha=alpha, lw=0)
                values += list(curve.lo) + list(curve.hi)
            values += _null_band(ax, curve.run, metric, nulls)
            temp = _temperature_delta(curve.run, metric)
            if temp is not None and round(temp, 9) not in temps:
                temps.add(round(temp, 9))
                ax.axhline(temp, color="k", ls="--", lw=1)
                values.append(temp)
        ax.axhline(0.0, color="k", lw=0.6)
        ps.y_range(ax, values, bounds=ps.metric_bounds(f"delta_{metric}"))
        ps.style_axes(ax, eta_axis(unit), f"Δ {metric} (final layer)", panel)
    _legend(fig, colour, styles)
    fig.suptitle(ps.plain(f"final-layer {metric}: change against η = 0"), fontsize=10)
    return fig


# --- the layer-range ablation ------------------------------------------------------------------------


def ablation_grids(runs: Sequence[Run], metric: str) -> dict[str, pd.DataFrame]:
    """Per panel (model × dataset, η unit and any other varying override) with several
    ``direction.layers``: a ranges × η grid of final-layer Δ``metric``; ``attrs`` hold the
    ``significant`` grid (``significant_<metric>``), the panel ``title`` and ``xlabel``."""
    from calibrate.io.compare.runs import _range_key

    steered = [(r, t) for r in runs if r.steering and (t := final_steering_rows(r)) is not None]
    labels = facet_labels([r for r, _ in steered], ("eta", "intervention.eta_scale",
                                                   "direction.layers"))
    rows = []
    for run, table in steered:
        if metric not in table.columns:
            continue
        sig = table.get(f"significant_{metric}", pd.Series(False, index=table.index))
        extra = labels[run.job_dir]
        title = model_dataset(run) if extra == NO_LABEL else f"{model_dataset(run)} · {extra}"
        rows += [{"panel": title, "unit": eta_unit(run),
                  "range": str(run.row.get("direction_layers") or "none"), "eta": float(e),
                  "value": float(d), "sig": bool(s) is True}
                 for e, d, s in zip(table["eta"], _delta(table, metric), sig.fillna(False))
                 if float(e) != 0.0]
    if not rows:
        return {}
    frame = pd.DataFrame(rows)
    grids = {}
    for (title, unit), part in frame.groupby(["panel", "unit"], sort=True):
        if part["range"].nunique() < 2:
            continue
        value = part.pivot_table(index="range", columns="eta", values="value", aggfunc="mean")
        sig = part.pivot_table(index="range", columns="eta", values="sig", aggfunc="max")
        order = sorted(value.index, key=_range_key)
        grid = value.loc[order]
        grid.attrs.update(significant=sig.loc[order].reindex(columns=grid.columns).fillna(False),
                          title=str(title), xlabel=eta_axis(str(unit)))
        grids[f"{title} ({unit})"] = grid
    return grids


def ablation_figure(runs: Sequence[Run], metric: str) -> Figure | None:
    """Heat maps of final-layer Δ``metric``, direction.layers × η, one panel per setting; a
    shared diverging scale centred on 0 and ``*`` on cells whose paired interval excludes 0."""
    grids = ablation_grids(runs, metric)
    if not grids:
        return None
    values = np.concatenate([g.to_numpy(float).ravel() for g in grids.values()])
    top = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    top = top or 1.0
    fig, axes = ps.facet_figure(len(grids), ["x" * 14], panel=(3.8, 2.9))
    image = None
    for ax, grid in zip(axes, grids.values()):
        data, sig = grid.to_numpy(float), grid.attrs["significant"].to_numpy(bool)
        image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="RdBu_r",
                          vmin=-top, vmax=top)
        ax.set_xticks(range(data.shape[1]), [f"{c:g}" for c in grid.columns],
                      fontsize=ps.FONT - 1)
        ax.set_yticks(range(data.shape[0]), [ps.plain(r) for r in grid.index],
                      fontsize=ps.FONT - 1)
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(j, i, f"{v:+.3f}{'*' if sig[i, j] else ''}", ha="center", va="center",
                        fontsize=6, color="white" if abs(v) > 0.6 * top else "black")
        ps.style_axes(ax, grid.attrs["xlabel"], "direction.layers", grid.attrs["title"])
        ax.grid(False)
    bar = fig.colorbar(image, ax=axes, label=ps.plain(f"Δ final-layer {metric}"),
                       shrink=0.8)
    bar.ax.tick_params(labelsize=ps.FONT - 1)
    fig.suptitle(ps.plain(f"layer-range ablation: Δ {metric} against η = 0 (* paired interval "
                          "excludes 0)"), fontsize=10)
    return fig


# --- null-space truncation ---------------------------------------------------------------------------


def nullspace_figure(table: pd.DataFrame, names: Sequence[str] | None = None) -> Figure | None:
    """Per run (one row each, named by ``names`` or the table's labels), the truncation's ΔECE
    and ΔMCE (dots) beside the random-subspace control (mean ± sd, grey)."""
    series = [m for m in ("ece", "mce") if f"delta_{m}" in table.columns]
    if table.empty or not series:
        return None
    names = [ps.short_label(n, width=48, lines=1) for n in (names or table["label"])]
    y = np.arange(len(names))[::-1]
    width = len(series) * 3.2 + ps.legend_width([max(names, key=len)]) + 0.4
    fig = Figure(figsize=(width, max(3.0, 0.18 * len(names) + 1.7)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(series), sharey=True))
    for ax, metric in zip(axes, series):
        random = table.get(f"random_delta_{metric}")
        if random is not None:
            err = table.get(f"random_delta_{metric}_std")
            ax.errorbar(random, y, xerr=None if err is None else err.fillna(0.0), fmt="s",
                        color="grey", ms=3, lw=1, label="random subspace (mean ± sd)")
        ax.plot(table[f"delta_{metric}"], y, "o", color="tab:red", ms=4, label="truncation")
        ax.axvline(0.0, color="k", lw=0.6)
        ps.style_axes(ax, f"Δ {metric}", "")
        ax.set_yticks(y, names, fontsize=ps.FONT - 1 if len(names) < 30 else 5)
        ax.set_ylim(-0.7, len(names) - 0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=2, fontsize=ps.FONT,
               frameon=False)
    fig.suptitle("null-space truncation against the random-subspace control", fontsize=10)
    return fig


# --- all of them -----------------------------------------------------------------------------------


def comparison_figures(runs: Sequence[Run], metrics: Sequence[str],
                       relative_depth: bool = False,
                       nullspace: pd.DataFrame | None = None) -> dict[str, Figure]:
    """Every comparison figure the runs allow, by file name (``layers_<metric>.png``,
    ``eta_<metric>.png``, ``ablation_<metric>.png``, ``nullspace_truncation.png``)."""
    figures: dict[str, Figure] = {}
    depths = {int(r.layers["layer"].max()) for r in runs
              if r.layers is not None and "layer" in r.layers}
    per_panel = group([r for r in runs if r.layers is not None], model_dataset)
    if any(len({int(r.layers["layer"].max()) for r in p}) > 1 for p in per_panel.values()) \
            and not relative_depth:
        _warn(f"runs of one model × dataset have different depths ({sorted(depths)} layers); "
              "--relative-depth puts them on one 0..1 axis")
    builders = (("layers", lambda m: layer_figure(runs, m, relative_depth)),
                ("eta", lambda m: eta_figure(runs, m)), ("ablation", lambda m: ablation_figure(runs, m)))
    for prefix, build in builders:
        for metric in metrics:
            fig = build(metric)
            if fig is not None:
                figures[f"{prefix}_{metric}.png"] = fig
            elif prefix == "layers":
                _warn(f"no layer table has the metric {metric!r}; no layers_{metric}.png")
    if nullspace is not None:
        from calibrate.io.compare.nullspace_json import nullspace_rows

        labels = facet_labels([r for r in runs if r.complete])
        names = [f"#{n} {model_dataset(r)} {labels[r.job_dir]}".replace(NO_LABEL, "")
                 for n, r in enumerate(runs, 1) for _ in nullspace_rows(r)]
        fig = nullspace_figure(nullspace, names if len(names) == len(nullspace) else None)
        if fig is not None:
            figures["nullspace_truncation.png"] = fig
    return figures


def save_all(figures: dict[str, Figure], out: Path, dpi: int = 110) -> list[Path]:
    """Write each figure as ``out/<name>`` (atomically); returns the paths."""
    from calibrate.io.plots import save_figure

    return [save_figure(fig, Path(out) / name, dpi) for name, fig in figures.items()]
