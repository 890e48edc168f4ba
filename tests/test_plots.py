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
