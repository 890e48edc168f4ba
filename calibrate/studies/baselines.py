"""The post-hoc baselines study: temperature scaling and histogram binning at every layer.

Each method is fit per layer on the calibration split's stored option scores and scored on the
evaluation split, with no extra forward pass. ``baselines.csv``: one row per method and layer,
with the fitted parameter and accuracy, ECE, MCE, NLL, Brier before and after.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from calibrate.config.validate import ConfigError
from calibrate.core.metrics import layer_table
from calibrate.core.posthoc import (
    METHODS,
    apply_histogram,
    apply_temperature,
    fit_histogram,
    fit_temperature,
)
from calibrate.core.option_scores import option_probabilities
from calibrate.io import results
from calibrate.io.track import Tracker
from calibrate.studies.base import Study, StudyResult, register
from calibrate.studies.context import JobContext

BASELINES_FILE = "baselines.csv"
COLUMNS = ("accuracy", "ece", "mce", "nll", "brier")


@dataclass(frozen=True)
class BaselineSettings:
    """The ``baselines`` intervention group."""

    methods: tuple[str, ...] = METHODS
    log_t_bounds: tuple[float, float] = (-5.0, 5.0)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> BaselineSettings:
        """Check and convert the ``baselines`` group; methods from
        :data:`calibrate.core.posthoc.METHODS`."""
        methods = tuple(cfg.get("methods") or ())
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise ConfigError(f"baselines.methods={list(methods)}; accepted: a non-empty list of "
                              f"{', '.join(METHODS)}")
        bounds = [float(x) for x in cfg.get("log_t_bounds") or ()]
        if len(bounds) != 2 or not bounds[0] < bounds[1]:
            raise ConfigError(f"baselines.log_t_bounds={bounds}; accepted: [low, high], low < high")
        return cls(methods, (bounds[0], bounds[1]))


def baseline_table(logits: np.ndarray, labels: np.ndarray, cal: np.ndarray, evaluation: np.ndarray,
                   settings: BaselineSettings, n_bins: int, binning: str) -> pd.DataFrame:
    """Per method and layer: the fitted parameter and the evaluation split's metrics before
    (``*_before``) and after. ``logits`` [N, L+1, K] option scores, ``labels`` [N]."""
    before = layer_table(option_probabilities(logits[evaluation]), labels[evaluation],
                         n_bins=n_bins, binning=binning, extra_bins=())
    valid = np.isfinite(logits[evaluation, 0])
    rows = []
    for method in settings.methods:
        after = np.empty_like(logits[evaluation], dtype=np.float64)
        params = []
        for layer in range(logits.shape[1]):
            fit_logits, ev_logits = logits[cal, layer], logits[evaluation, layer]
            if method == "temperature":
                t = fit_temperature(fit_logits, labels[cal], settings.log_t_bounds)
                after[:, layer], param = apply_temperature(ev_logits, t), t
            else:
                acc = fit_histogram(option_probabilities(fit_logits), labels[cal], n_bins, binning)
                after[:, layer] = apply_histogram(option_probabilities(ev_logits), acc, n_bins,
                                                  binning, valid)
                param = float(np.nansum(~np.isnan(acc)))  # bins with a fitted accuracy
            params.append(param)
        table = layer_table(after, labels[evaluation], n_bins=n_bins, binning=binning, extra_bins=())
        for layer, param in enumerate(params):
            row = {"layer": layer, "method": method, "parameter": param}
            row.update({f"{c}_before": float(before[c].iloc[layer]) for c in COLUMNS})
            row.update({c: float(table[c].iloc[layer]) for c in COLUMNS})
            rows.append(row)
    return pd.DataFrame(rows)


def baselines_at(table: pd.DataFrame, layer: int) -> dict[str, dict[str, float]]:
    """Each method's parameter and metrics (before and after) at one layer."""
    rows = table[table["layer"] == layer]
    keep = ("parameter", *COLUMNS, *(f"{c}_before" for c in COLUMNS))
    return {row["method"]: {k: float(row[k]) for k in keep} for row in rows.to_dict("records")}


@dataclass
class BaselinesResult(StudyResult):
    """The baselines table and the unsteered evaluation report."""

    table: pd.DataFrame | None = None
    files: ClassVar[tuple[str, ...]] = (BASELINES_FILE,)

    def write(self, job_dir: Path) -> None:
        results.write_csv(Path(job_dir) / BASELINES_FILE, self.table)

    def log(self, tracker: Tracker, job_dir: Path) -> None:
        tracker.log_table("baselines", self.table)
        for method in self.table["method"].unique():
            rows = self.table[self.table["method"] == method].drop(columns="method")
            tracker.log_layers(rows, prefix=f"baselines/{method}/")


@register
class BaselinesStudy(Study):
    """Post-hoc recalibration per layer, fit on the calibration split, scored on the evaluation
    split: the reference any calibration direction has to beat."""

    name = "baselines"

    @classmethod
    def settings(cls, config: Mapping[str, Any]) -> BaselineSettings:
        return BaselineSettings.from_mapping(config["baselines"])

    def run(self, ctx: JobContext) -> BaselinesResult:
        base = ctx.probe()
        cal, evaluation = ctx.split()
        metrics = ctx.spec.metrics
        table = baseline_table(base.option_logits, base.labels, cal, evaluation,
                               ctx.spec.study_settings, metrics.n_bins, metrics.binning)
        summary = {"n_calibration": int(len(cal)), "n_evaluation": int(len(evaluation)),
                   "baselines": baselines_at(table, int(table["layer"].max()))}
        return BaselinesResult(ctx.report(base.take(evaluation), ctx.prompt_set.subset(evaluation)),
                               summary, table=table)
