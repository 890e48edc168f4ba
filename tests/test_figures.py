"""Every comparison and per-job figure at 1, 8 and 100 synthetic runs: the axes keep at least
half of the figure's area and every label, title, tick label and legend lies inside the figure
(measured by matplotlib's renderer after a draw)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from calibrate.core.metrics import softmax64
from calibrate.io import plots
from calibrate.io.compare import comparison_figures, comparison_tables, load_runs
from calibrate.io.report.synthetic import write_sweep

SIZES = (1, 8, 100)
COMPARISON = ("layers_ece.png", "eta_ece.png", "ablation_ece.png", "nullspace_truncation.png")
TOLERANCE = 1.0  # pixels


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> dict[int, dict[str, Figure]]:
    """The comparison figures (metric: ECE) of synthetic sweeps of 1, 8 and 100 runs."""
    out = {}
    for n in SIZES:
        sweep = write_sweep(tmp_path_factory.mktemp(f"sweep{n}"), n, failed=1 if n > 1 else 0,
                            summary=False)
        runs = load_runs([sweep])
        tables = comparison_tables(runs)
        out[n] = comparison_figures(runs, ["ece"], nullspace=tables.get("nullspace.csv"))
    return out


def layout(fig: Figure) -> tuple[float, object, object]:
    """(share of the figure covered by data axes, the tight bbox of everything drawn, the
    figure's bbox), both boxes in pixels."""
    FigureCanvasAgg(fig)
    fig.set_dpi(40)  # low resolution: the layout is in inches, the draw is cheaper
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    data_axes = [ax for ax in fig.axes if not hasattr(ax, "_colorbar")]
    share = sum(ax.get_position().width * ax.get_position().height for ax in data_axes)
    drawn = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)
    return share, drawn, fig.bbox


def assert_fits(fig: Figure, name: str) -> None:
    share, drawn, box = layout(fig)
    assert share >= 0.5, f"{name}: the axes cover {share:.0%} of the figure"
    assert drawn.x0 >= box.x0 - TOLERANCE and drawn.y0 >= box.y0 - TOLERANCE, (name, drawn, box)
    assert drawn.x1 <= box.x1 + TOLERANCE and drawn.y1 <= box.y1 + TOLERANCE, (name, drawn, box)
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    for legend in legends:
        extent = legend.get_window_extent(fig.canvas.get_renderer())
        assert extent.x1 <= box.x1 + TOLERANCE and extent.y0 >= box.y0 - TOLERANCE, name


@pytest.mark.parametrize("n", SIZES)
def test_comparison_figures_fit(figures, n):
    expected = [name for name in COMPARISON if not (n == 1 and name == "ablation_ece.png")]
    assert sorted(figures[n]) == sorted(expected)  # one run has one layer range: no heat map
    for name, fig in figures[n].items():
        assert_fits(fig, f"{name} ({n} runs)")


def test_figures_scale_with_runs_but_stay_bounded(figures):
    """More runs: more panels, never a strip; the legend keeps a bounded number of entries."""
    small, large = figures[8]["eta_ece.png"], figures[100]["eta_ece.png"]
    assert len(large.axes) > len(small.axes)
    assert large.get_figheight() > small.get_figheight()
    for fig in (small, large):
        (legend,) = fig.legends
        assert len(legend.get_texts()) <= 18


def test_eta_units_never_share_an_axis(figures):
    for fig in (figures[100]["eta_ece.png"], figures[8]["eta_ece.png"]):
        labels = [ax.get_xlabel() for ax in fig.axes]
        assert set(labels) <= {"η (absolute)", "η (× mean residual norm)"}
    both = {ax.get_xlabel() for ax in figures[100]["eta_ece.png"].axes}
    assert len(both) == 2  # the 100-run sweep has both units: in separate panels


def job_figures(tmp_path, n: int) -> dict[str, Figure]:
    """The per-job figures of synthetic run 0 of ``n`` (layer curves, η curves, reliability,
    the per-η overlay)."""
    sweep = write_sweep(tmp_path / f"s{n}", n, nullspace=False)
    job = sweep / "0"
    layers, steering = pd.read_csv(job / "layers.csv"), pd.read_csv(job / "steering.csv")
    null, baselines = pd.read_csv(job / "null.csv"), pd.read_csv(job / "baselines.csv")
    rng = np.random.default_rng(0)
    probs, labels = softmax64(rng.normal(size=(300, 4)) * 2), rng.integers(0, 4, 300)
    per_eta = {f"eta={e:g}": steering[steering["eta"] == e] for e in steering["eta"].unique()}
    title = "a model with a rather long name on a dataset with a long name too: steering"
    return {
        "layer_curves": plots.layer_curves_figure(layers, title, chance=0.5, baselines=baselines),
        "eta_curves": plots.eta_curves_figure(steering, title, null=null, baselines=baselines,
                                              unit="residual_norm"),
        "reliability": plots.reliability_figure(probs, labels, title),
        "overlay": plots.overlay_figure(per_eta, "ece", title),
    }


def test_job_figures_fit(tmp_path):
    for name, fig in job_figures(tmp_path, 8).items():
        assert_fits(fig, name)


def test_overlay_of_many_curves_fits():
    tables = {f"run {i} with the overrides that set it apart, long": pd.DataFrame(
        {"layer": range(5), "ece": np.linspace(0.1, 0.2, 5) + i / 1000}) for i in range(100)}
    fig = plots.overlay_figure(tables, "ece", "100 curves")
    assert_fits(fig, "overlay of 100")
    assert len(fig.legends[0].get_texts()) == 18  # capped, the last one counts the rest
    assert fig.legends[0].get_texts()[-1].get_text().startswith("+ 83 more")
