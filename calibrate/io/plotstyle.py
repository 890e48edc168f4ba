"""Figure conventions shared by the per-job plots and the comparison: facet grids sized for their
legend, y-ranges that keep the scale, no offset notation, colours and labels that scale to many
runs.

Every figure is a ``matplotlib.figure.Figure`` with constrained layout, drawn by the Agg canvas
(no pyplot state). The legend goes outside the axes (right of the panels), its entries wrapped
and capped so it never outgrows the figure.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Iterable, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, ScalarFormatter

MIN_SPAN = 0.05  # the smallest y-span of a probability-scale metric (accuracy, ECE, MCE ...)
UNIT_METRICS = frozenset({"accuracy", "confidence", "ece", "mce", "rmsce", "brier", "ece_10",
                          "mce_10", "ece_adaptive", "ece_debiased", "smece", "aurc", "option_mass",
                          "changed"})
LABEL_WIDTH = 34  # characters per legend line
LABEL_LINES = 3
MAX_ENTRIES = 18  # legend entries before "+ N more"
FONT = 8
PANEL = (4.0, 3.0)  # inches per facet
CHAR_INCH = 0.075  # width of one legend character at FONT points (DejaVu Sans, generous)


_DOLLAR = re.compile(r"(?<!\\)\$")


def plain(text: object) -> str:
    """``text`` drawn as it is: every ``$`` escaped, so that matplotlib never reads a run name or
    path as mathtext (which renders it as a formula, or fails the figure on a bad one).
    Idempotent."""
    return _DOLLAR.sub(r"\\$", str(text))


def short_label(text: str, width: int = LABEL_WIDTH, lines: int = LABEL_LINES) -> str:
    """``text`` wrapped to ``width`` characters, at most ``lines`` lines (the last ends in …),
    drawn as plain text (:func:`plain`)."""
    wrapped = textwrap.wrap(str(text), width, break_long_words=True, break_on_hyphens=False)
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1] + "…"
    return plain("\n".join(wrapped)) or "(none)"


def legend_width(labels: Iterable[str], fontsize: float = FONT) -> float:
    """Inches a legend of ``labels`` needs (handle and padding included); 0 without labels."""
    lines = [line for label in labels for line in str(label).splitlines()]
    if not lines:
        return 0.0
    return max(len(line) for line in lines) * CHAR_INCH * fontsize / FONT + 0.9


def legend_height(labels: Iterable[str], fontsize: float = FONT) -> float:
    """Inches a one-column legend of ``labels`` needs (at most :data:`MAX_ENTRIES` entries)."""
    labels = list(labels)[:MAX_ENTRIES]
    lines = sum(len(str(label).splitlines()) or 1 for label in labels)
    return (lines * 0.16 + len(labels) * 0.08) * fontsize / FONT + 0.2 if labels else 0.0


def facet_shape(n: int, max_cols: int = 4) -> tuple[int, int]:
    """(rows, columns) of a grid for ``n`` panels, at most ``max_cols`` wide."""
    cols = max(1, min(n, max_cols, math.ceil(math.sqrt(n))))
    return math.ceil(n / cols), cols


def facet_figure(n: int, legend_labels: Sequence[str] = (), panel: tuple[float, float] = PANEL,
                 max_cols: int = 4, title_lines: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure of ``n`` panels (unused grid cells removed) with room for a legend of
    ``legend_labels`` to the right and a title of ``title_lines`` lines."""
    rows, cols = facet_shape(n, max_cols)
    scale = 1.5 if n == 1 else 1.0  # a lone panel gets room of its own
    width = cols * panel[0] * scale + legend_width(legend_labels)
    height = max(rows * panel[1] * scale, legend_height(legend_labels)) + 0.25 * title_lines + 0.3
    fig = Figure(figsize=(width, height), layout="constrained")
    grid = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in grid[n:]:
        fig.delaxes(ax)
    return fig, list(grid[:n])


def plain_numbers(ax: Axes) -> None:
    """No offset or scientific notation on either axis (0.0012, not 1.2e-3 + 0.9)."""
    for axis in (ax.xaxis, ax.yaxis):
        formatter = axis.get_major_formatter()
        if isinstance(formatter, ScalarFormatter):
            formatter.set_useOffset(False)
            formatter.set_scientific(False)


def y_range(ax: Axes, values: Iterable[float], min_span: float = MIN_SPAN,
            bounds: tuple[float | None, float | None] = (None, None)) -> None:
    """Set the y-limits around the finite ``values`` with 5 % padding, never narrower than
    ``min_span`` (so a 0.008 change does not look like a cliff), shifted to stay in ``bounds``."""
    data = np.asarray([v for v in values if v is not None], dtype=float)
    data = data[np.isfinite(data)]
    if not data.size:
        return
    lo, hi = float(data.min()), float(data.max())
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    if hi - lo < min_span:
        middle = (lo + hi) / 2
        lo, hi = middle - min_span / 2, middle + min_span / 2
    low, high = bounds
    if low is not None and lo < low:
        lo, hi = low, hi + (low - lo)
    if high is not None and hi > high:
        lo, hi = lo - (hi - high), high
        lo = lo if low is None else max(lo, low)
    ax.set_ylim(lo, hi)
    plain_numbers(ax)


def metric_bounds(metric: str) -> tuple[float | None, float | None]:
    """The range a metric can take (probability-scale metrics: 0..1; deltas: -1..1)."""
    base = metric.removeprefix("delta_")
    if base in UNIT_METRICS:
        return (-1.0, 1.0) if metric.startswith("delta_") else (0.0, 1.0)
    return (None, None)


def colours(n: int) -> list[tuple[float, ...]]:
    """``n`` distinguishable colours: tab10, tab20, then a sampled sequential map."""
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.92, n)]


def outside_legend(fig: Figure, handles: Sequence, labels: Sequence[str],
                   max_entries: int = MAX_ENTRIES, title: str | None = None) -> None:
    """The figure's legend to the right of all panels; past ``max_entries`` the rest is counted
    in a last entry ("+ N more")."""
    if not handles:
        return
    handles, labels = list(handles), [short_label(lab) for lab in labels]
    if len(handles) > max_entries:
        more = len(handles) - (max_entries - 1)
        handles = handles[: max_entries - 1] + [Line2D([], [], linestyle="none")]
        labels = labels[: max_entries - 1] + [f"+ {more} more (see the tables)"]
    fig.legend(handles, labels, loc="outside right upper", fontsize=FONT, title=title,
               title_fontsize=FONT, frameon=False)


def style_axes(ax: Axes, xlabel: str, ylabel: str, title: str | None = None) -> None:
    """Labels at the shared font size, a light grid, plain tick numbers; a ``layer`` x-axis
    gets integer ticks."""
    if xlabel == "layer":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(plain(xlabel), fontsize=FONT)
    ax.set_ylabel(plain(ylabel), fontsize=FONT)
    if title:
        ax.set_title(short_label(title, width=44, lines=2), fontsize=FONT + 1)
    ax.tick_params(labelsize=FONT - 1)
    ax.grid(alpha=0.3)
    plain_numbers(ax)
