"""The neurons study's figures: every neuron by norm and null-space fraction, and the
final-layer effect of each ablation against its matched null.

``neurons_figure``: one point per MLP neuron of the chosen blocks, output-weight norm (log x)
against the fraction of its squared norm in U_k, the top candidates ringed and the
entropy-neuron candidates filled red (Stolfo et al.'s picture). ``ablation_figure``: per arm,
the final layer's ΔECE and Δentropy, total and direct, with their paired intervals and the
matched null's 5–95 % band. Conventions of :mod:`calibrate.io.plotstyle`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from calibrate.io import plotstyle as ps
from calibrate.io.plots import save_figure


def neurons_figure(neurons: pd.DataFrame, title: str, top_k: int | None = None) -> Figure:
    """Norm against null-space fraction for every neuron (``neurons``: the study's table)."""
    fig, (ax,) = ps.facet_figure(1, ["other neurons", "top candidates", "entropy candidates"])
    top_k = int(top_k if top_k is not None else min(8, len(neurons)))
    top = neurons["rank"] <= top_k
    flagged = neurons["entropy_candidate"].astype(bool)
    ax.scatter(neurons["norm"], neurons["null_fraction"], s=4, color="grey", alpha=0.4,
               lw=0, label="other neurons")
    ax.scatter(neurons.loc[top, "norm"], neurons.loc[top, "null_fraction"], s=40,
               facecolors="none", edgecolors="tab:blue", label="top candidates")
    ax.scatter(neurons.loc[flagged, "norm"], neurons.loc[flagged, "null_fraction"], s=14,
               color="tab:red", label="entropy candidates")
    for row in neurons[top].to_dict("records"):
        ax.annotate(f"{int(row['block'])}.{int(row['neuron'])}",
                    (row["norm"], row["null_fraction"]), fontsize=ps.FONT - 2,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ps.style_axes(ax, "output weight norm", "fraction in U_k (null space)")
    handles, labels = ax.get_legend_handles_labels()
    ps.outside_legend(fig, handles, labels)
    fig.suptitle(ps.short_label(title, 70, 2), fontsize=10)
    return fig


def plot_neurons(neurons: pd.DataFrame, path: Path, title: str, top_k: int | None = None) -> Path:
    """Write :func:`neurons_figure` as PNG to ``path``."""
    return save_figure(neurons_figure(neurons, title, top_k), path)


def ablation_figure(table: pd.DataFrame, title: str) -> Figure:
    """Final-layer ΔECE and Δentropy per arm (rows of the study's ablation table at its last
    layer), total and direct side by side, with intervals and the null's band."""
    last = table[table["layer"] == table["layer"].max()]
    arms = list(dict.fromkeys(last["arm"]))
    fig, axes = ps.facet_figure(2, ["total", "direct", "null 5-95 %"])
    x = np.arange(len(arms))
    for ax, metric in zip(axes, ("ece", "entropy")):
        values: list[float] = [0.0]
        for offset, (effect, colour) in zip((-0.15, 0.15), (("total", "tab:blue"),
                                                           ("direct", "tab:orange"))):
            rows = last[last["effect"] == effect].set_index("arm")
            present = [a for a in arms if a in rows.index]
            if not present:
                continue
            pos = np.array([arms.index(a) for a in present]) + offset
            mid = rows.loc[present, f"delta_{metric}"].to_numpy(float)
            lo_col, hi_col = f"delta_{metric}_lo", f"delta_{metric}_hi"
            if lo_col in rows.columns:
                lo = rows.loc[present, lo_col].to_numpy(float)
                hi = rows.loc[present, hi_col].to_numpy(float)
                ax.errorbar(pos, mid, yerr=[mid - lo, hi - mid], fmt="o", ms=3, color=colour,
                            label=effect, capsize=2)
                values += [*lo, *hi]
            else:
                ax.plot(pos, mid, "o", ms=3, color=colour, label=effect)
            values += list(mid)
            p05, p95 = f"null_delta_{metric}_p05", f"null_delta_{metric}_p95"
            if p05 in rows.columns:
                for p, a, b in zip(pos, rows.loc[present, p05], rows.loc[present, p95]):
                    if np.isfinite(a) and np.isfinite(b):
                        ax.plot([p, p], [a, b], color="grey", lw=5, alpha=0.35,
                                label="null 5-95 %")
                        values += [a, b]
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xticks(x, [ps.plain(a) for a in arms], rotation=60, fontsize=ps.FONT - 2)
        ps.y_range(ax, values, min_span=0.01)
        ps.style_axes(ax, "arm", f"final-layer Δ{metric}")
    handles: dict = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    ps.outside_legend(fig, list(handles.values()), list(handles))
    fig.suptitle(ps.short_label(title, 70, 2), fontsize=10)
    return fig


def plot_ablation(table: pd.DataFrame, path: Path, title: str) -> Path:
    """Write :func:`ablation_figure` as PNG to ``path``."""
    return save_figure(ablation_figure(table, title), path)
