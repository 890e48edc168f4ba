"""Per-layer curves, reliability diagrams and run overlays as PNG files.

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg canvas, so no
pyplot state or GUI backend is involved and nothing needs closing. Every image is written to a
temporary name in the target folder and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from calibrate.core.metrics import SUM_ATOL, _check_probs, bin_statistics, ece, mce
from calibrate.core.phases import Phases
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
        ax.plot([phases.peak_ece_layer], [phases.peak_ece], "r*", ms=12, label="peak")


def plot_layer_curves(
    table: pd.DataFrame,
    path: Path,
    title: str,
    phases: Phases | None = None,
    chance: float | None = None,
) -> Path:
    """2x2 panels of accuracy, confidence, ECE and MCE against layer.

    Args:
        table: per-layer table (``layer_table``) with layer, accuracy, confidence, ece, mce.
        path: PNG to write.
        title: figure title.
        phases: when given, shade the correction layers and mark the plateau and ECE peak.
        chance: when given, a horizontal chance line on the accuracy panel (e.g. 1/K).

    Returns:
        ``path``.
    """
    missing = {"layer"} | {m for m, _ in CURVE_PANELS}
    missing -= set(table.columns)
    if missing:
        raise ValueError(f"table lacks column(s) {sorted(missing)}")
    fig = Figure(figsize=(10, 7), layout="constrained")
    for ax, (metric, label) in zip(fig.subplots(2, 2).ravel(), CURVE_PANELS):
        ax.plot(table["layer"], table[metric], "o-", ms=3)
        if metric == "accuracy" and chance is not None:
            ax.axhline(chance, color="k", ls=":", lw=1, label=f"chance {chance:.2f}")
        if phases is not None:
            _mark_phases(ax, phases, metric)
        ax.set(xlabel="layer", ylabel=label, title=label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_reliability(
    probs: np.ndarray,
    labels: np.ndarray,
    path: Path,
    title: str,
    n_bins: int = 15,
    binning: str = "guo",
) -> Path:
    """Reliability diagram of top-label confidence, with a bin-count histogram below.

    Args:
        probs: [N, K] option probabilities.
        labels: [N] integer labels.
        path: PNG to write.
        title: figure title; ECE and MCE are appended.
        n_bins, binning: as in ``calibrate.core.metrics.bin_statistics``. The torchmetrics extra
            slot (confidence exactly 1.0) is drawn as a point at 1.0.

    Returns:
        ``path``.
    """
    p, y = _check_probs(probs, labels, 2, SUM_ATOL)
    conf, correct = p.max(axis=1), p.argmax(axis=1) == y
    stats = bin_statistics(conf, correct, n_bins, binning)
    lower, upper = stats.bounds()
    width, full = upper - lower, stats.count > 0
    bar = full & (width > 0)
    fig = Figure(figsize=(6, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    top.bar(lower[bar], stats.accuracy[bar], width[bar], align="edge", edgecolor="k",
            alpha=0.8, label="accuracy")
    top.plot(stats.mean_confidence[full], stats.accuracy[full], "k.", label="(mean conf, acc)")
    point = full & (width == 0)
    if point.any():
        label = f"conf = 1.0 (n={stats.count[-1]})"
        top.plot(lower[point], stats.accuracy[point], "bs", label=label)
    top.plot([0, 1], [0, 1], "r--", lw=1, label="perfect calibration")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    top.legend(fontsize=8, loc="upper left")
    bottom.bar(lower[width > 0], stats.count[width > 0], width[width > 0], align="edge",
               edgecolor="k", color="grey")
    bottom.set(xlabel="confidence", ylabel="count")
    e, m = ece(conf, correct, n_bins, binning), mce(conf, correct, n_bins, binning)
    top.set_title(f"{title}\nECE {e:.4f}  MCE {m:.4f}  (N={len(conf)}, {n_bins} bins)")
    return save_figure(fig, path)


def plot_overlay(
    tables: Mapping[str, pd.DataFrame],
    metric: str,
    path: Path,
    title: str,
    relative_depth: bool = False,
) -> Path:
    """Several runs' per-layer curves of one metric on one axis.

    Args:
        tables: run name -> per-layer table with ``layer`` and ``metric`` columns.
        metric: the column to plot.
        path: PNG to write.
        title: figure title.
        relative_depth: plot against layer / last layer (0..1), to compare models of
            different depth.

    Returns:
        ``path``.
    """
    if not tables:
        raise ValueError("no tables to overlay")
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for name, table in tables.items():
        if metric not in table.columns or "layer" not in table.columns:
            raise ValueError(f"table {name!r} lacks column 'layer' or {metric!r}")
        x = table["layer"].to_numpy(float)
        if relative_depth:
            x = x / max(x.max(), 1.0)
        ax.plot(x, table[metric], "o-", ms=3, label=name)
    ax.set(xlabel="relative depth" if relative_depth else "layer", ylabel=metric, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_eta_curves(steering: pd.DataFrame, path: Path, title: str, layer: int | None = None) -> Path:
    """Accuracy, ECE and MCE against eta at one layer (default: the last) of a steering table."""
    layer = int(steering["layer"].max()) if layer is None else layer
    rows = steering[steering["layer"] == layer].sort_values("eta")
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 3), ("accuracy", "ece", "mce")):
        ax.plot(rows["eta"], rows[metric], "o-")
        ax.set(xlabel="eta", ylabel=metric, title=f"{metric} at layer {layer}")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)


# --- comparison plots (calibrate.io.compare) -------------------------------------------------------


def plot_eta_lines(
    lines: Mapping[str, pd.DataFrame],
    metric: str,
    path: Path,
    title: str,
) -> Path:
    """One metric against eta, one line per named table (each with ``eta`` and ``metric``).

    Rows sharing an eta within one table are averaged (several jobs of one configuration).
    """
    if not lines:
        raise ValueError("no lines to plot")
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for name, table in lines.items():
        if metric not in table.columns or "eta" not in table.columns:
            raise ValueError(f"table {name!r} lacks column 'eta' or {metric!r}")
        points = table.groupby("eta", sort=True)[metric].mean()
        ax.plot(points.index.to_numpy(float), points.to_numpy(float), "o-", ms=4, label=name)
    ax.set(xlabel="eta", ylabel=metric, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_heatmaps(
    panels: Mapping[str, pd.DataFrame],
    path: Path,
    title: str,
    value_label: str,
    xlabel: str = "eta",
    ylabel: str = "direction.layers",
) -> Path:
    """One annotated heat map per panel; each panel a matrix (index: rows, columns: x values).

    Missing cells (NaN) stay blank. All panels share one colour scale.
    """
    if not panels:
        raise ValueError("no panels to plot")
    values = np.concatenate([p.to_numpy(float).ravel() for p in panels.values()])
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    n = len(panels)
    height = max(3.0, 0.5 * max(len(p.index) for p in panels.values()) + 2.0)
    fig = Figure(figsize=(min(5.5 * n, 22), height), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n))
    image = None
    for ax, (name, panel) in zip(axes, panels.items()):
        data = panel.to_numpy(float)
        image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="viridis",
                          vmin=vmin, vmax=vmax)
        ax.set_xticks(range(data.shape[1]), [f"{c:g}" if isinstance(c, (int, float)) else str(c)
                                             for c in panel.columns])
        ax.set_yticks(range(data.shape[0]), [str(r) for r in panel.index])
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v):
                dark = (v - vmin) / (vmax - vmin) < 0.6
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=name)
    fig.colorbar(image, ax=list(axes), label=value_label)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_grouped_bars(
    table: pd.DataFrame,
    panels: Mapping[str, Mapping[str, str]],
    path: Path,
    title: str,
    errors: Mapping[str, str] | None = None,
) -> Path:
    """Grouped bars, one panel per entry of ``panels`` (panel title -> {bar label -> column}).

    ``table`` has one row per group (its index names the groups on the x axis); ``errors`` maps a
    value column to a column of error-bar half-widths. NaN values draw no bar.
    """
    if table.empty or not panels:
        raise ValueError("nothing to plot")
    errors = dict(errors or {})
    names = [str(i) for i in table.index]
    x = np.arange(len(names))
    fig = Figure(figsize=(max(6.0, 1.2 * len(names) * len(panels) + 2), 4.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (panel, series) in zip(axes, panels.items()):
        width = 0.8 / max(len(series), 1)
        for k, (label, column) in enumerate(series.items()):
            if column not in table.columns:
                continue
            y = table[column].to_numpy(float)
            err = None
            if errors.get(column) in table.columns:
                err = table[errors[column]].to_numpy(float)
                err = np.where(np.isfinite(err), err, 0.0)
            ax.bar(x + (k - (len(series) - 1) / 2) * width, np.nan_to_num(y), width, yerr=err,
                   capsize=3, label=label, alpha=0.85)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set(title=panel, ylabel=panel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)
