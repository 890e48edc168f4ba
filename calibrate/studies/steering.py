"""The steering study: fit ĉ on the calibration split, add η·ĉ, measure the evaluation split.

Outputs (besides the probe job's files, computed on the evaluation part): ``steering.csv`` (one
row per η and layer), ``direction.safetensors`` + ``direction.json``, ``eta_curves.png`` and
``steered_ece.png``. The unsteered probe comes from :mod:`calibrate.engine.cache`, so a sweep over
η neither reloads the model (same process) nor redoes the probe (any process).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from calibrate.config.spec import JobSpec, eta_edit_ratio
from calibrate.core.direction import Direction, save_direction
from calibrate.core.paired import add_paired_columns, multiple_comparisons
from calibrate.engine.lens import option_probabilities
from calibrate.engine.probe import ProbeResult
from calibrate.engine.readout import last_layer_logits
from calibrate.engine.steer import DirectionSweep, Steering, residual_norms, steering_table
from calibrate.io import results
from calibrate.io.track import Tracker
from calibrate.studies.base import Study, StudyResult, register
from calibrate.studies.baselines import (
    BASELINES_FILE,
    BaselineSettings,
    baseline_table,
    baselines_at,
)
from calibrate.studies.context import JobContext
from calibrate.studies.directions import obtain_direction
from calibrate.studies.null import NULL_FILE, direction_null, null_skip_reason, null_vectors

LOG = logging.getLogger("calibrate")
STEERING_FILE = "steering.csv"
FILES = (STEERING_FILE, "direction.safetensors", "direction.json", "eta_curves.png",
         "steered_ece.png", "gradient_fit.csv", "gradient_fit.png")
DIRECTION_SUMMARY = ("method", "layers", "raw_norm", "dataset", "cross_model_transfer",
                     "cosine_to_direction", "cosine_layer_diff", "null_space_rho", "eta_fit",
                     "fit_prompt", "prompt_transfer")


@dataclass
class SteeringResult(StudyResult):
    """ĉ, the steering table (one row per η and layer, on the evaluation split) and the
    unsteered evaluation report."""

    direction: Direction | None = None
    table: pd.DataFrame | None = None
    etas: tuple[float, ...] = ()
    eta_scale: str | None = None  # the unit of eta: absolute | residual_norm
    plots_on: bool = True  # output.plots: also the gradient fit's loss-curve figure
    null: pd.DataFrame | None = None  # the random-direction null, one row per η ≠ 0
    baselines: pd.DataFrame | None = None  # post-hoc baselines per layer, same split
    files: ClassVar[tuple[str, ...]] = (*FILES, NULL_FILE, BASELINES_FILE)

    def write(self, job_dir: Path) -> None:
        results.write_csv(job_dir / STEERING_FILE, self.table)
        save_direction(self.direction, job_dir, plots=self.plots_on)
        if self.null is not None and len(self.null):
            results.write_csv(job_dir / NULL_FILE, self.null)
        if self.baselines is not None:
            results.write_csv(job_dir / BASELINES_FILE, self.baselines)

    def plot(self, job_dir: Path, title: str) -> dict[str, Path]:
        from calibrate.io.plots import plot_eta_curves, plot_overlay

        per_eta = {f"eta={eta:g}": self.table[self.table["eta"] == eta] for eta in self.etas}
        return {
            "eta_curves": plot_eta_curves(self.table, job_dir / "eta_curves.png",
                                          f"{title}: steering", null=self.null,
                                          baselines=self.baselines, unit=self.eta_scale),
            "steered_ece": plot_overlay(per_eta, "ece", job_dir / "steered_ece.png",
                                        f"{title}: ECE per layer for each eta"),
        }

    def log(self, tracker: Tracker, job_dir: Path) -> None:
        for eta in self.etas:
            rows = self.table[self.table["eta"] == eta].drop(columns="eta")
            tracker.log_layers(rows, prefix=f"steered/eta={eta:g}/")
        tracker.log_table("steering", self.table)
        meta = self.direction.meta
        tracker.log_artifact(f"direction-{meta.get('model')}-{meta.get('dataset')}", "direction",
                             [job_dir / "direction.safetensors", job_dir / "direction.json"], meta)


@register
class SteeringStudy(Study):
    """η·ĉ added at ``intervention.layers``; every η of the job on one evaluation split."""

    name = "steering"

    @classmethod
    def settings(cls, config: Mapping[str, Any]) -> BaselineSettings:
        """The post-hoc baselines shown beside every η (the ``baselines`` group)."""
        return BaselineSettings.from_mapping(config["baselines"])

    def run(self, ctx: JobContext) -> SteeringResult:
        spec = ctx.spec
        fit = obtain_direction(ctx)
        layers, base, cal = fit.steer_layers, fit.base, fit.cal_idx
        scale = None
        if spec.intervention.eta_scale == "residual_norm":
            scale = residual_norms({l: base.residuals[l][cal] for l in layers}, layers)
        _warn_edit_ratio(spec, base, cal, layers, scale)
        steering = Steering(fit.direction.vector, tuple(layers), spec.etas,
                            spec.intervention.position, scale)
        eval_set = ctx.prompt_set.subset(fit.eval_idx)
        logits, null, null_note = _steer_with_null(ctx, fit, eval_set, steering)
        table = steering_table(logits, eval_set.labels, list(spec.etas), spec.metrics.n_bins,
                               spec.metrics.binning, 0)
        table, comparisons = paired(table, logits, eval_set.labels, "eta", spec)
        baselines = baseline_table(base.option_logits, base.labels, cal, fit.eval_idx,
                                   spec.study_settings, spec.metrics.n_bins, spec.metrics.binning)
        meta = fit.direction.meta
        meta.update(intervention_layers=layers, position=steering.position,
                    eta_scale=spec.intervention.eta_scale, layer_scale=scale,
                    config_hash=spec.identity)  # the result these files belong to
        summary = {"intervention": "direction", "etas": list(spec.etas),
                   "intervention_layers": list(layers), "eta_scale": meta["eta_scale"],
                   "position": steering.position, "n_calibration": int(len(cal)),
                   "n_evaluation": int(len(fit.eval_idx)),
                   "direction": {k: meta.get(k) for k in DIRECTION_SUMMARY},
                   "steering": steering_summary(table), **comparisons, "null": null_note,
                   "baselines": baselines_at(baselines, max(layers)), "baselines_layer": max(layers)}
        return SteeringResult(ctx.report(base.take(fit.eval_idx), eval_set), summary,
                              direction=fit.direction, table=table, etas=spec.etas,
                              eta_scale=spec.intervention.eta_scale, null=null,
                              baselines=baselines, plots_on=spec.output.plots)


def _warn_edit_ratio(spec: JobSpec, base: ProbeResult, cal_idx: np.ndarray,
                     layers: Sequence[int], scale: Mapping[int, float] | None) -> None:
    """Warn when the largest edit ‖η·ĉ‖ dwarfs the residual it is added to."""
    limit = spec.output.edit_ratio_warn
    if not limit:
        return
    for layer in layers:
        norm = float(np.linalg.norm(base.residuals[layer][cal_idx], axis=-1).mean())
        ratio = eta_edit_ratio(spec.etas, (scale or {}).get(layer), norm)
        if ratio > limit:
            LOG.warning("eta=%g adds an edit %.3g times the mean residual norm (%.4g) at layer %d "
                        "(checks.edit_ratio_warn=%g): the model's output is swamped; consider "
                        "intervention.eta_scale=residual_norm or a smaller eta",
                        max(abs(e) for e in spec.etas), ratio, norm, layer, limit)


def _steer_with_null(ctx: JobContext, fit: Any, eval_set: Any, steering: Steering
                     ) -> tuple[np.ndarray, pd.DataFrame | None, dict[str, Any]]:
    """ĉ's steered scores [E, N, L+1, K] and the null of ``direction.n_random`` random
    directions steered the same way.

    At the last layer with one token per option both are read from the probe's last residual
    (no forward pass). Elsewhere ĉ is the first direction of one sweep that also runs the
    random ones, so the prompts run once for both.
    """
    spec, n_random, etas = ctx.spec, ctx.spec.direction.n_random, ctx.spec.etas
    layers, last = list(steering.layers), ctx.num_layers - 1
    base = fit.base.take(fit.eval_idx)
    if not n_random or len(etas) < 2:
        return ctx.steered(eval_set, steering, base), None, {"n_random": 0}
    reason = null_skip_reason(steering.position, eval_set.is_cloze, layers == [last])
    if reason:
        LOG.info("random-direction null skipped: %s", reason)
        return ctx.steered(eval_set, steering, base), None, {"n_random": n_random,
                                                            "skipped": reason}
    vectors = null_vectors(fit.direction.vector, n_random, spec.direction.seed + 1)
    if ctx.reads_last_layer(eval_set, steering):
        logits = ctx.steered(eval_set, steering, base)
        swept = last_layer_logits(ctx.loaded, base.residuals[last], eval_set.option_ids, vectors,
                                  np.asarray(etas), (steering.layer_scale or {}).get(last, 1.0))
    else:
        every = ctx.steered(eval_set, DirectionSweep(vectors, tuple(layers), etas, "last",
                                                     steering.layer_scale))
        logits, final = every[:len(etas)], every[:, :, -1]  # ĉ's etas come first
        swept = final.reshape(len(vectors), len(etas), *final.shape[1:])
    table = direction_null(swept, eval_set.labels, etas, spec.metrics.n_bins,
                           spec.metrics.binning)
    return logits, table, {"n_random": n_random, "layers": layers,
                           "per_eta": table.to_dict("records")}


def paired(table: pd.DataFrame, logits: np.ndarray, labels: np.ndarray, column: str,
           spec: JobSpec) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Paired bootstrap intervals of every arm's deltas against the first (η = 0, or no
    ablation), with ``metrics.bootstrap`` replicates; the multiple-comparisons note."""
    m = spec.metrics
    if not m.bootstrap:
        return table, {}
    table = add_paired_columns(table, option_probabilities(logits), labels, column, 0,
                               m.bootstrap, m.alpha, m.seed, m.n_bins, m.binning)
    return table, {"comparisons": multiple_comparisons(table, column, table[column].iloc[0],
                                                       m.alpha)}


def steering_summary(table: pd.DataFrame) -> dict[str, Any]:
    """Final-layer figures per eta, for metrics.json and the tracker summary."""
    last = table[table["layer"] == table["layer"].max()]
    cols = ["accuracy", "ece", "mce", "delta_accuracy", "delta_ece", "delta_mce", "changed",
            "delta_ece_lo", "delta_ece_hi", "significant_ece", "delta_accuracy_lo",
            "delta_accuracy_hi"]
    return {f"{eta:g}": {c: (bool(row[c]) if c.startswith("significant") else float(row[c]))
                         for c in cols if c in row}
            for eta, row in zip(last["eta"], last.to_dict("records"))}
