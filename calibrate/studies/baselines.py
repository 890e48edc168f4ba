"""The post-hoc baselines study: every method of :mod:`calibrate.core.posthoc` at every layer.

Each method (temperature scaling, histogram binning, per-option bias, vector scaling, isotonic
regression, the late-layer ensemble: ``baselines.methods``) is fit per layer on the calibration
split's stored option scores and scored on the evaluation split, with no extra forward pass.
``baselines.csv``: one row per method and layer, with the fitted parameter, accuracy, ECE, MCE,
NLL, Brier before and after and their deltas; at the last layer each method's paired interval
against the raw model, its p-value and the correction over the methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd

from calibrate.core.posthoc import baseline_table, baselines_at
from calibrate.io import results
from calibrate.io.track import Tracker
from calibrate.studies.job_context import JobContext
from calibrate.studies.study import Study, StudyResult, register

BASELINES_FILE = "baselines.csv"


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

    reads = ("baselines", "direction.calibration_fraction", "direction.seed")

    def run(self, ctx: JobContext) -> BaselinesResult:
        base = ctx.probe()
        cal, evaluation = ctx.split()
        metrics = ctx.spec.metrics
        table = baseline_table(base.option_logits, base.labels, cal, evaluation,
                               ctx.spec.baselines, metrics.n_bins, metrics.binning,
                               paired=metrics, tested_layer=ctx.num_layers - 1)
        summary = {"n_calibration": int(len(cal)), "n_evaluation": int(len(evaluation)),
                   "baselines": baselines_at(table, int(table["layer"].max())),
                   "baselines_layer": int(table["layer"].max())}
        return BaselinesResult(ctx.report(base.take(evaluation), ctx.prompt_set.subset(evaluation)),
                               summary, table=table)
