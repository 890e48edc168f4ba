"""A job's figures: per-layer curves, reliability diagrams, steering against η and overlays.

Each ``*_figure`` function builds a ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state,
nothing to close) and its ``plot_*`` twin writes it as PNG. Every image is written to a
temporary name in the target folder and renamed into place, so a reader never sees half a file.
Conventions (:mod:`calibrate.io.plotstyle`): intervals as bands, y-ranges of at least 0.05 on
probability-scale metrics, no offset notation, legends outside the axes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from calibrate.core.metrics import SUM_ATOL, _check_probs, bin_statistics, ece, mce
from calibrate.core.phases import Phases
from calibrate.io import plotstyle as ps
from calibrate.io.results import atomic_write

CURVE_PANELS: tuple[tuple[str, str], ...] = (
    ("accuracy", "accuracy"),
    ("confidence", "mean confidence"),
    ("ece", "ECE"),
    ("mce", "MCE"),
)


def save_figure(fig: Figure, path: Path, dpi: int = 120) -> Path:
    """Render ``fig`` as PNG to ``path`` atomically (temp file in the same folder, then rename)."""
    FigureCanvasAgg(fig)
    return atomic_write(Path(path), lambda handle: fig.savefig(handle, format="png", dpi=dpi))


def _mark_phases(ax: Axes, phases: Phases, metric: str) -> None:
    if phases.correction_layers:
        lo, hi = min(phases.correction_layers), max(phases.correction_layers)
        ax.axvspan(lo - 0.5, hi + 0.5, color="tab:green", alpha=0.15, label="correction")
    if phases.plateau_layer is not None:
        ax.axvline(phases.plateau_layer, color="grey", ls="--", lw=1, label="plateau")
    if metric == "ece" and phases.peak_ece_layer is not None:
        ax.plot([phases.peak_ece_layer], [phases.peak_ece], "r*", ms=10, label="ECE peak")


def _band(ax: Axes, x: Any, table: pd.DataFrame, metric: str, colour: Any = "tab:blue",
          offset: Any = 0.0) -> list[float]:
    """Fill ``<metric>_lo/hi`` (plus ``offset``) around a curve; the values drawn."""
    lo, hi = f"{metric}_lo", f"{metric}_hi"
    if lo not in table.columns or hi not in table.columns:
        return []
    low, high = table[lo].to_numpy(float) + offset, table[hi].to_numpy(float) + offset
    ax.fill_between(x, low, high, color=colour, alpha=0.2, lw=0, label="95 % interval")
    return [*low, *high]


def _figure_legend(fig: Figure, axes: Any) -> None:
    """One legend outside the panels with every distinct entry of ``axes``."""
    seen: dict[str, Any] = {}
    for ax in np.atleast_1d(axes).ravel():
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    ps.outside_legend(fig, list(seen.values()), list(seen))


def layer_curves_figure(table: pd.DataFrame, title: str, phases: Phases | None = None,
                        chance: float | None = None,
                        baselines: pd.DataFrame | None = None) -> Figure:
    """2x2 panels of accuracy, confidence, ECE and MCE against layer, with the bootstrap
    interval where ``table`` has ``<metric>_lo/hi``, the phases, the chance line and the
    temperature-scaling baseline (``baselines`` rows with ``method == "temperature"``)."""
    missing = {"layer"} | {m for m, _ in CURVE_PANELS}
    missing -= set(table.columns)
    if missing:
        raise ValueError(f"table lacks column(s) {sorted(missing)}")
    temp = None
    if baselines is not None and "method" in baselines.columns:
        temp = baselines[baselines["method"] == "temperature"].sort_values("layer")
    fig = Figure(figsize=(9, 6.2), layout="constrained")
    axes = fig.subplots(2, 2)
    x = table["layer"].to_numpy(float)
    for ax, (metric, label) in zip(axes.ravel(), CURVE_PANELS):
        ax.plot(x, table[metric], "o-", ms=2.5, color="tab:blue", label="lens readout")
        values = [*table[metric], *_band(ax, x, table, metric)]
        if metric == "accuracy" and chance is not None:
            ax.axhline(chance, color="k", ls=":", lw=1, label="chance")
            values.append(chance)
        if temp is not None and len(temp) and metric in temp.columns:
            ax.plot(temp["layer"], temp[metric], "--", lw=1, color="tab:orange",
                    label="temperature scaling")
            values += list(temp[metric])
        if phases is not None:
            _mark_phases(ax, phases, metric)
        ps.y_range(ax, values, bounds=ps.metric_bounds(metric))
        ps.style_axes(ax, "layer", label, label)
    _figure_legend(fig, axes)
    fig.suptitle(ps.short_label(title, 80, 2), fontsize=10)
    return fig


def plot_layer_curves(
    table: pd.DataFrame,
    path: Path,
    title: str,
    phases: Phases | None = None,
    chance: float | None = None,
    baselines: pd.DataFrame | None = None,
) -> Path:
    """Write :func:`layer_curves_figure` as PNG to ``path``; returns ``path``.

    Args:
        table: per-layer table (``layer_table``) with layer, accuracy, confidence, ece, mce
            (and optionally ``accuracy_lo/hi``, ``ece_lo/hi``).
        path: PNG to write.
        title: figure title.
        phases: when given, shade the correction layers and mark the plateau and ECE peak.
        chance: when given, a horizontal chance line on the accuracy panel (e.g. 1/K).
        baselines: when given, the baselines table (``baselines.csv``) for the temperature
            line.
    """
    return save_figure(layer_curves_figure(table, title, phases, chance, baselines), path)


def reliability_figure(probs: np.ndarray, labels: np.ndarray, title: str, n_bins: int = 15,
                       binning: str = "guo") -> Figure:
    """Reliability diagram of top-label confidence with the bin counts below it."""
    p, y = _check_probs(probs, labels, 2, SUM_ATOL)
    conf, correct = p.max(axis=1), p.argmax(axis=1) == y
    stats = bin_statistics(conf, correct, n_bins, binning)
    lower, upper = stats.bounds()
    width, full = upper - lower, stats.count > 0
    bar = full & (width > 0)
    fig = Figure(figsize=(6.4, 6.2), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    top.bar(lower[bar], stats.accuracy[bar], width[bar], align="edge", edgecolor="k",
            alpha=0.8, label="accuracy per bin")
    top.plot(stats.mean_confidence[full], stats.accuracy[full], "k.", label="(mean conf, acc)")
    point = full & (width == 0)
    if point.any():
        top.plot(lower[point], stats.accuracy[point], "bs",
                 label=f"conf = 1.0 (n={stats.count[-1]})")
    top.plot([0, 1], [0, 1], "r--", lw=1, label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1))
    ps.style_axes(top, "", "accuracy")
    bottom.bar(lower[width > 0], stats.count[width > 0], width[width > 0], align="edge",
               edgecolor="k", color="grey", label="examples per bin")
    ps.style_axes(bottom, "confidence", "count")
    bottom.set_ylim(0, max(1, int(stats.count.max())) * 1.1)
    e, m = ece(conf, correct, n_bins, binning), mce(conf, correct, n_bins, binning)
    _figure_legend(fig, [top, bottom])
    fig.suptitle(f"{ps.short_label(title, 60, 2)}\nECE {e:.4f}  MCE {m:.4f}  "
                 f"(N={len(conf)}, {n_bins} bins)", fontsize=10)
    return fig


def plot_reliability(
    probs: np.ndarray,
    labels: np.ndarray,
    path: Path,
    title: str,
    n_bins: int = 15,
    binning: str = "guo",
) -> Path:
    """Write :func:`reliability_figure` as PNG to ``path``; returns ``path``.

    Args:
        probs: [N, K] option probabilities.
        labels: [N] integer labels.
        path: PNG to write.
        title: figure title; ECE and MCE are appended.
        n_bins, binning: as in ``calibrate.core.metrics.bin_statistics``. The torchmetrics extra
            slot (confidence exactly 1.0) is drawn as a point at 1.0.
    """
    return save_figure(reliability_figure(probs, labels, title, n_bins, binning), path)


def risk_coverage_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str) -> Figure:
    """Risk against coverage, one curve per named layer (each ``(confidence, correct)``), the
    AURC in the legend and each curve's full-coverage error rate as a dotted line."""
    from calibrate.core.selective import aurc, risk_coverage

    labels = [f"{name} (AURC {aurc(*c):.3f})" for name, c in curves.items()]
    fig, (ax,) = ps.facet_figure(1, labels)
    for colour, label, (conf, right) in zip(ps.colours(len(curves)), labels, curves.values()):
        coverage, risk = risk_coverage(conf, right)
        ax.plot(coverage, risk, "-", color=colour, label=label)
        ax.axhline(risk[-1], color=colour, ls=":", lw=0.8)
    ax.set_xlabel("coverage (answers kept, most confident first)")
    ax.set_ylabel("risk (error rate of the answers kept)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0.0, 1.0)
    fig.suptitle(title)
    _figure_legend(fig, [ax])
    return fig


def plot_risk_coverage(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path,
                       title: str) -> Path:
    """Write :func:`risk_coverage_figure` as PNG to ``path``; returns ``path``."""
    return save_figure(risk_coverage_figure(curves, title), path)


def overlay_figure(tables: Mapping[str, pd.DataFrame], metric: str, title: str,
                   relative_depth: bool = False) -> Figure:
    """Several per-layer curves of one metric on one axis (bands where the tables have
    ``<metric>_lo/hi``), the legend outside."""
    if not tables:
        raise ValueError("no tables to overlay")
    for name, table in tables.items():
        if metric not in table.columns or "layer" not in table.columns:
            raise ValueError(f"table {name!r} lacks column 'layer' or {metric!r}")
    labels = [ps.short_label(n) for n in tables]
    fig, (ax,) = ps.facet_figure(1, labels[: ps.MAX_ENTRIES])
    values: list[float] = []
    for colour, (name, table) in zip(ps.colours(len(tables)), tables.items()):
        x = table["layer"].to_numpy(float)
        if relative_depth:
            x = x / max(x.max(), 1.0)
        ax.plot(x, table[metric], "o-", ms=2.5, color=colour, label=name)
        values += [*table[metric], *_band(ax, x, table, metric, colour)]
    ps.y_range(ax, values, bounds=ps.metric_bounds(metric))
    ps.style_axes(ax, "relative depth" if relative_depth else "layer", metric)
    handles, names = ax.get_legend_handles_labels()
    keep = [i for i, n in enumerate(names) if n != "95 % interval"]
    ps.outside_legend(fig, [handles[i] for i in keep], [names[i] for i in keep])
    fig.suptitle(ps.short_label(title, 70, 2), fontsize=10)
    return fig


def plot_overlay(
    tables: Mapping[str, pd.DataFrame],
    metric: str,
    path: Path,
    title: str,
    relative_depth: bool = False,
) -> Path:
    """Write :func:`overlay_figure` as PNG to ``path``; returns ``path``.

    Args:
        tables: run name -> per-layer table with ``layer`` and ``metric`` columns.
        metric: the column to plot.
        path: PNG to write.
        title: figure title.
        relative_depth: plot against layer / last layer (0..1), to compare models of
            different depth.
    """
    return save_figure(overlay_figure(tables, metric, title, relative_depth), path)


ETA_UNITS = {"absolute": "η (absolute)", "residual_norm": "η (× mean residual norm)"}


def eta_curves_figure(steering: pd.DataFrame, title: str, layer: int | None = None,
                      null: pd.DataFrame | None = None, baselines: pd.DataFrame | None = None,
                      unit: str | None = None) -> Figure:
    """Accuracy, ECE and MCE against η at one layer (default: the last), with the paired
    interval of each η against η = 0 (``delta_<metric>_lo/hi``), the random-direction null's
    5–95 % band (``null``, null.csv) and the temperature-scaling baseline at that layer."""
    layer = int(steering["layer"].max()) if layer is None else layer
    rows = steering[steering["layer"] == layer].sort_values("eta")
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    eta = rows["eta"].to_numpy(float)
    for ax, metric in zip(axes, ("accuracy", "ece", "mce")):
        ref = float(rows.loc[rows["eta"] == 0.0, metric].iloc[0]) if (rows["eta"] == 0).any() \
            else float("nan")
        ax.plot(eta, rows[metric], "o-", ms=3, color="tab:blue", label="steered by ĉ")
        values = [*rows[metric], *_band(ax, eta, rows, f"delta_{metric}", offset=ref)]
        values += _null_reference(ax, null, metric, ref)
        values += _temperature_reference(ax, baselines, metric, layer)
        ps.y_range(ax, values, bounds=ps.metric_bounds(metric))
        ps.style_axes(ax, ETA_UNITS.get(unit or "", "η"), metric, f"{metric} at layer {layer}")
    _figure_legend(fig, axes)
    fig.suptitle(ps.short_label(title, 80, 2), fontsize=10)
    return fig


def _null_reference(ax: Axes, null: pd.DataFrame | None, metric: str, ref: float) -> list[float]:
    lo, hi = f"null_delta_{metric}_p05", f"null_delta_{metric}_p95"
    if null is None or not {"eta", lo, hi} <= set(null.columns) or not np.isfinite(ref):
        return []
    rows = null.sort_values("eta")
    eta = np.concatenate([[0.0], rows["eta"].to_numpy(float)])
    low = ref + np.concatenate([[0.0], rows[lo].to_numpy(float)])
    high = ref + np.concatenate([[0.0], rows[hi].to_numpy(float)])
    ax.fill_between(eta, low, high, color="grey", alpha=0.25, lw=0,
                    label="random directions 5–95 %")
    return [*low, *high]


def _temperature_reference(ax: Axes, baselines: pd.DataFrame | None, metric: str,
                           layer: int) -> list[float]:
    if baselines is None or not {"method", "layer", metric} <= set(baselines.columns):
        return []
    row = baselines[(baselines["method"] == "temperature") & (baselines["layer"] == layer)]
    if not len(row):
        return []
    value = float(row[metric].iloc[0])
    ax.axhline(value, color="tab:orange", ls="--", lw=1, label="temperature scaling (η = 0)")
    return [value]


def plot_eta_curves(steering: pd.DataFrame, path: Path, title: str, layer: int | None = None,
                    null: pd.DataFrame | None = None, baselines: pd.DataFrame | None = None,
                    unit: str | None = None) -> Path:
    """Write :func:`eta_curves_figure` as PNG to ``path``; returns ``path``."""
    return save_figure(eta_curves_figure(steering, title, layer, null, baselines, unit), path)
