"""calibrate.io.plotstyle: y-ranges that keep the scale, plain tick numbers, bounded legends."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from calibrate.io import plotstyle as ps


def axes():
    fig = Figure()
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def test_small_changes_get_the_minimum_span():
    _, ax = axes()
    ax.plot([0, 1], [0.500, 0.508])
    ps.y_range(ax, [0.500, 0.508])
    lo, hi = ax.get_ylim()
    assert hi - lo == pytest.approx(ps.MIN_SPAN) and lo < 0.5 and hi > 0.508


def test_range_shifts_inside_bounds_and_wide_data_is_padded():
    _, ax = axes()
    ps.y_range(ax, [0.0, 0.01], bounds=(0.0, 1.0))
    assert ax.get_ylim() == pytest.approx((0.0, ps.MIN_SPAN + 0.0005 / 1), abs=1e-3)
    ps.y_range(ax, [0.2, 0.8], bounds=(0.0, 1.0))
    assert ax.get_ylim() == pytest.approx((0.17, 0.83))
    ps.y_range(ax, [0.99, 1.0], bounds=(0.0, 1.0))
    assert ax.get_ylim()[1] == 1.0 and ax.get_ylim()[0] == pytest.approx(1.0 - ps.MIN_SPAN,
                                                                         abs=1e-3)


def test_no_offset_notation():
    fig, ax = axes()
    ax.plot([0, 1], [1000.001, 1000.002])
    ps.style_axes(ax, "layer", "x")
    fig.canvas.draw()
    assert ax.yaxis.get_major_formatter().get_offset() == ""
    assert ps.metric_bounds("delta_ece") == (-1.0, 1.0) and ps.metric_bounds("nll") == (None, None)


def test_labels_legends_and_grids():
    assert ps.short_label("a " * 100, width=10, lines=2).count("\n") == 1
    assert ps.short_label("a " * 100, width=10, lines=2).endswith("…")
    assert ps.facet_shape(1) == (1, 1) and ps.facet_shape(4) == (2, 2)
    assert ps.facet_shape(20) == (5, 4)
    fig, axs = ps.facet_figure(5, ["label"])
    assert len(axs) == 5 and len(fig.axes) == 5
    lines = [axs[0].plot([0], [0])[0] for _ in range(30)]
    ps.outside_legend(fig, lines, [f"run {i}" for i in range(30)])
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(texts) == ps.MAX_ENTRIES and texts[-1].startswith("+ 13 more")
    assert len(ps.colours(5)) == 5 and len(set(ps.colours(40))) == 40


def _pixels(text: str, **kwargs) -> np.ndarray:
    fig = Figure(figsize=(3, 1))
    canvas = FigureCanvasAgg(fig)
    fig.text(0.05, 0.5, text, **kwargs)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


@pytest.mark.parametrize("text", ["$x^2$", "a$\\frac$b", "cost $5 and $6", "$"])
def test_dollars_are_drawn_as_written(text):
    """A run name with ``$`` draws exactly as matplotlib draws it with math parsing off."""
    assert (_pixels(ps.plain(text)) == _pixels(text, parse_math=False)).all()
    assert ps.plain(ps.plain(text)) == ps.plain(text)


def test_a_label_that_is_bad_mathtext_still_draws():
    """Legend entries, titles and axis labels of a hostile run name (invalid as mathtext)."""
    fig, axs = ps.facet_figure(1, ["x"])
    name = "run $\\frac$ {eta=4}"
    ps.outside_legend(fig, [axs[0].plot([0, 1], [0, 1])[0]], [name])
    ps.style_axes(axs[0], name, name, name)
    fig.savefig(io.BytesIO(), format="png")
    assert fig.legends[0].get_texts()[0].get_text() == ps.plain(name)
