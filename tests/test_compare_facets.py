"""calibrate.io.compare.facets: labels from the overrides that differ, without bookkeeping;
the η unit of a run."""

from __future__ import annotations

from pathlib import Path

from calibrate.io.compare.facets import eta_axis, eta_unit, facet_labels, varying_labels
from calibrate.io.compare.runs import Run


def run(name: str, overrides: list[str], metrics: dict | None = None) -> Run:
    return Run("s", Path(name), overrides, {"model": "m", "dataset": "d"},
               metrics if metrics is not None else {"status": "complete"})


def test_labels_drop_bookkeeping_and_facet_keys():
    runs = [run("0", ["model=a", "tracker=none", "direction.layers=[26,27,28]",
                      "dataset.local_path=../shared/data/rotten_tomatoes"]),
            run("1", ["model=b", "direction.layers=[27,28,29]",
                      "dataset.local_path=../shared/data/rotten_tomatoes"])]
    assert varying_labels(runs) == {
        Path("0"): "model=a direction.layers=26-28", Path("1"): "model=b direction.layers=27-29"}
    assert facet_labels(runs) == {Path("0"): "direction.layers=26-28",
                                  Path("1"): "direction.layers=27-29"}
    same = [run("0", ["model=a", "x=1"]), run("1", ["model=b", "x=1"])]
    assert set(facet_labels(same).values()) == {"(same overrides)"}


def test_long_path_values_keep_their_last_part():
    runs = [run("0", ["dataset.local_path=/very/long/path/to/the/data/rotten_tomatoes"]),
            run("1", [])]
    assert varying_labels(runs)[Path("0")] == "dataset.local_path=…/rotten_tomatoes"


def test_eta_unit_from_metrics_config_or_overrides():
    assert eta_unit(run("0", [], {"eta_scale": "residual_norm"})) == "residual_norm"
    assert eta_unit(run("0", [], {"config": {"intervention": {"eta_scale": "absolute"}}})) \
        == "absolute"
    assert eta_unit(run("0", ["intervention.eta_scale=residual_norm"], {})) == "residual_norm"
    assert eta_unit(run("0", [], {})) == "unknown"
    assert eta_axis("unknown") == "η (unit not recorded)" != eta_axis("absolute")
