"""Tests of calibrate.io.plots: valid PNGs written atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from calibrate.core.metrics import layer_table, softmax64
from calibrate.core.phases import detect_phases
from calibrate.io.plots import plot_layer_curves, plot_overlay, plot_reliability

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left


@pytest.fixture()
def run() -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(0)
    scale = np.linspace(0.1, 4.0, 8)[None, :, None]
    probs = softmax64(rng.normal(size=(200, 8, 4)) * scale)
    labels = rng.integers(0, 4, 200)
    return probs, labels, layer_table(probs, labels)


def test_layer_curves(tmp_path: Path, run) -> None:
    _, _, table = run
    acc = [0.25, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5]
    ece = [0.05, 0.06, 0.08, 0.1, 0.2, 0.3, 0.2, 0.1]
    table = table.assign(accuracy=acc, ece=ece)
    phases = detect_phases(table)
    assert phases.correction_layers == [6, 7]
    out = plot_layer_curves(table, tmp_path / "curves.png", "test", phases=phases, chance=0.25)
    assert out == tmp_path / "curves.png"
    _assert_png(out)


def test_layer_curves_without_phases_overwrites(tmp_path: Path, run) -> None:
    path = tmp_path / "curves.png"
    path.write_bytes(b"old")
    _assert_png(plot_layer_curves(run[2], path, "plain"))


@pytest.mark.parametrize("binning", ["guo", "torchmetrics"])
def test_reliability(tmp_path: Path, run, binning: str) -> None:
    probs, labels, _ = run
    last = probs[:, -1].copy()
    last[:5] = [1.0, 0.0, 0.0, 0.0]  # a torchmetrics 1.0 slot to draw
    path = tmp_path / "sub" / "rel.png"
    out = plot_reliability(last, labels, path, "rel", n_bins=10, binning=binning)
    _assert_png(out)


def test_overlay(tmp_path: Path, run) -> None:
    table = run[2]
    shallow = table.iloc[::2].assign(layer=lambda t: np.arange(len(t)))
    out = plot_overlay({"deep": table, "shallow": shallow}, "ece", tmp_path / "o.png", "overlay",
                       relative_depth=True)
    _assert_png(out)
    with pytest.raises(ValueError, match="'brier2'"):
        plot_overlay({"deep": table}, "brier2", tmp_path / "bad.png", "x")


def test_failed_save_leaves_nothing(tmp_path: Path, run, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_layer_curves(run[2], tmp_path / "curves.png", "x")
    assert list(tmp_path.iterdir()) == []


def _bands(fig: Figure) -> int:
    from matplotlib.collections import PolyCollection

    return sum(isinstance(c, PolyCollection) for ax in fig.axes for c in ax.collections)


def test_layer_curves_draw_intervals_baseline_and_a_minimum_span(run) -> None:
    from calibrate.io.plots import layer_curves_figure

    table = run[2].assign(accuracy=0.5 + 0.001 * np.arange(8))
    table = table.assign(accuracy_lo=table.accuracy - 0.02, accuracy_hi=table.accuracy + 0.02,
                         ece_lo=table.ece * 0.9, ece_hi=table.ece * 1.1)
    baselines = pd.DataFrame({"layer": range(8), "method": "temperature", "accuracy": 0.5,
                              "confidence": 0.5, "ece": 0.01, "mce": 0.02})
    fig = layer_curves_figure(table, "t", chance=0.25, baselines=baselines)
    assert _bands(fig) == 2  # accuracy and ECE have intervals, confidence and MCE do not
    accuracy = fig.axes[0]
    lo, hi = accuracy.get_ylim()
    assert hi - lo >= 0.05  # a 0.007 change does not fill the panel
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"temperature scaling", "chance", "95 % interval"} <= set(labels)


def test_eta_curves_show_the_null_and_the_baseline(tmp_path: Path) -> None:
    from calibrate.io.plots import eta_curves_figure

    steering = pd.DataFrame({"eta": [0.0, 2.0, 4.0], "layer": 3, "accuracy": [0.6, 0.6, 0.59],
                             "ece": [0.2, 0.15, 0.1], "mce": [0.3, 0.2, 0.2],
                             "delta_ece_lo": [0.0, -0.07, -0.12],
                             "delta_ece_hi": [0.0, -0.03, -0.08]})
    null = pd.DataFrame({"eta": [2.0, 4.0], "null_delta_ece_p05": [-0.01, -0.02],
                         "null_delta_ece_p95": [0.01, 0.02]})
    baselines = pd.DataFrame({"layer": [3], "method": ["temperature"], "accuracy": [0.6],
                              "ece": [0.05], "mce": [0.1]})
    fig = eta_curves_figure(steering, "t", null=null, baselines=baselines, unit="absolute")
    ece_ax = fig.axes[1]
    assert ece_ax.get_xlabel() == "η (absolute)"
    assert sum(1 for _ in ece_ax.collections) == 2  # the paired interval and the null band
    assert any(np.allclose(line.get_ydata(), 0.05) for line in ece_ax.get_lines())


def test_reliability_has_a_count_histogram(run) -> None:
    from calibrate.io.plots import reliability_figure

    probs, labels, _ = run
    fig = reliability_figure(probs[:, -1], labels, "t", n_bins=10)
    top, bottom = fig.axes
    assert bottom.get_ylabel() == "count" and bottom.get_xlabel() == "confidence"
    assert sum(p.get_height() for p in bottom.patches) == len(labels)


def test_risk_coverage_figure_draws_each_layers_curve(tmp_path):
    from calibrate.core.selective import aurc, risk_coverage
    from calibrate.io.plots import plot_risk_coverage, risk_coverage_figure

    rng = np.random.default_rng(1)
    curves = {name: (rng.random(40), rng.random(40) < 0.7) for name in ("layer 3", "layer 9")}
    fig = risk_coverage_figure(curves, "t")
    lines = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "-"]
    assert len(lines) == 2
    for line, (conf, right) in zip(lines, curves.values()):
        coverage, risk = risk_coverage(conf, right)
        np.testing.assert_array_equal(line.get_xdata(), coverage)
        np.testing.assert_array_equal(line.get_ydata(), risk)
        assert f"AURC {aurc(conf, right):.3f}" in line.get_label()
    path = plot_risk_coverage(curves, tmp_path / "rc.png", "t")
    assert path.read_bytes().startswith(b"\x89PNG")
