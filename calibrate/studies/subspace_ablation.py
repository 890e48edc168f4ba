"""Subspace ablations: null-space truncation and removal of the calibration direction.

``intervention=nullspace`` projects the residual at the chosen layers onto the complement of
U_k, the bottom-k left singular vectors of the model's own unembedding (zero ablation; mean
ablation keeps the calibration split's mean component instead), next to a random k-dimensional
subspace of the same size at the same layers (the control). ``intervention=direction_ablate``
removes the component along c_hat, next to a random direction. Both also report how aligned
c_hat (and each per-layer c_l) is with U_k against random unit vectors.

Outputs: ``ablation.csv`` (one row per variant and layer, deltas against no ablation) and, for
the null space, ``nullspace.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from calibrate.config.spec import JobSpec
from calibrate.core import nullspace
from calibrate.core.deltas import steering_table
from calibrate.core.metrics import MetricSettings
from calibrate.core.random_null import null_skip_reason, random_bases, subspace_null
from calibrate.directions.fit import obtain_direction
from calibrate.engine.edits import SubspaceAblation
from calibrate.engine.last_layer import last_layer_logits, last_layer_truncated_logits
from calibrate.io import results
from calibrate.io.nullspace_cache import cached_null_space
from calibrate.io.track import Tracker
from calibrate.model.assets import cache_root
from calibrate.model.load import LoadedModel
from calibrate.studies.job_context import JobContext
from calibrate.studies.study import Study, StudyResult, register

ABLATION_FILE = "ablation.csv"
NULLSPACE_FILE = "nullspace.json"
FILES = [ABLATION_FILE, NULLSPACE_FILE, "ablation.png"]


def _variant_table(metrics: MetricSettings, logits: np.ndarray, labels: np.ndarray,
                   names: tuple[str, ...]) -> pd.DataFrame:
    return steering_table(logits, labels, list(names), metrics.n_bins, metrics.binning,
                          0, column="variant")


def final_deltas(table: pd.DataFrame, variant: str) -> dict[str, float]:
    """Final-layer deltas of one variant against no ablation."""
    rows = table[(table["variant"] == variant) & (table["layer"] == table["layer"].max())]
    row = rows.iloc[0]
    keys = ("delta_accuracy", "delta_ece", "delta_mce", "changed", "accuracy", "ece", "mce",
            "delta_ece_lo", "delta_ece_hi", "delta_mce_lo", "delta_mce_hi", "p_ece",
            "p_adjusted_ece")
    out = {k: float(row[k]) for k in keys if k in row}
    for flag in ("significant_ece", "significant_adjusted_ece"):
        if flag in row:
            out[flag] = bool(row[flag])
    return out


def _means(fit, layers: tuple[int, ...], ablation: str) -> dict[int, np.ndarray] | None:
    if ablation == "zero":
        return None
    return {l: fit.base.residuals[l][fit.cal_idx].astype(np.float64).mean(axis=0) for l in layers}


def _bases(spec: JobSpec, kind: str, loaded: LoadedModel, fit) -> tuple[dict, tuple, tuple]:
    """(report, bases, names) for the null space or the direction ablation."""
    hidden = loaded.adapter.unembed_weight.shape[1]
    ncfg = spec.nullspace
    seed = ncfg.seed
    if kind == "direction_ablate":
        rand = nullspace.random_unit_vectors(1, hidden, seed)[0].numpy()
        return {}, (fit.direction.vector[:, None], rand[:, None]), ("none", "direction", "random")
    k = ncfg.k_for(hidden)
    weight = loaded.adapter.unembed_weight.detach().cpu()
    basis, sv = cached_null_space(weight, k, cache_root(spec.cache_dir))
    per_layer = {l: torch.as_tensor(v) for l, v in fit.per_layer.items()}
    report = nullspace.alignment_report(torch.as_tensor(fit.direction.vector), basis, per_layer or None,
                                        ncfg.n_random, seed)
    report.update(fraction=ncfg.fraction, singular_values=sv.tolist(),
                  ones_alignment=nullspace.ones_direction_alignment(basis),
                  unembed_hash=loaded.unembed_hash)
    control = nullspace.random_subspace(hidden, k, seed).numpy()
    return report, (basis.numpy(), control), ("none", "nullspace", "random")


@dataclass
class AblationResult(StudyResult):
    """The variant table (none, the ablation, its random control; one row per variant and
    layer, on the evaluation split) and the null-space report."""

    kind: str = "nullspace"
    table: pd.DataFrame | None = None
    ablation_report: dict[str, Any] = field(default_factory=dict)
    per_layer: dict[int, np.ndarray] = field(default_factory=dict)
    files: ClassVar[tuple[str, ...]] = tuple(FILES)

    def write(self, job_dir: Path) -> None:
        results.write_csv(Path(job_dir) / ABLATION_FILE, self.table)
        if self.kind == "nullspace":
            results.write_json(Path(job_dir) / NULLSPACE_FILE, self.ablation_report)

    def plot(self, job_dir: Path, title: str) -> dict[str, Path]:
        from calibrate.io.plots import plot_overlay

        table = self.table
        per_variant = {v: table[table["variant"] == v] for v in table["variant"].unique()}
        return {"ablation": plot_overlay(per_variant, "ece", Path(job_dir) / "ablation.png",
                                         f"{title}: ECE per layer, {self.kind} ablation vs control")}

    def tracker_summary(self) -> dict[str, Any]:
        report = self.ablation_report
        flat: dict[str, Any] = {}
        if report.get("direction_raw_norm") is not None:
            flat["direction/raw_norm"] = report["direction_raw_norm"]
        for key in ("rho", "rho_random_mean", "p_value", "max_cosine", "k"):
            if key in report:
                flat[f"nullspace/{key}"] = report[key]
        for part in ("truncation", "random_control"):
            for metric, value in (report.get(part) or {}).items():
                flat[f"ablation/{part}/{metric}"] = value
        return flat

    def headline(self) -> list[str]:
        report, lines = self.ablation_report, []
        if "rho" in report:
            lines.append(f"  c_hat in the null space: rho {report['rho']:.4f} (random "
                         f"{report.get('rho_random_mean', float('nan')):.4f}), p = "
                         f"{report.get('p_value', float('nan')):.3g}")
        for part in ("truncation", "random_control"):
            values = report.get(part) or {}
            if values:
                lines.append(f"  {part.replace('_', ' ')}: ECE {values.get('delta_ece', 0):+.4f}, "
                             f"accuracy {values.get('delta_accuracy', 0):+.3f}")
        return lines

    def log(self, tracker: Tracker, job_dir: Path) -> None:
        for variant in self.table["variant"].unique():
            rows = self.table[self.table["variant"] == variant].drop(columns="variant")
            tracker.log_layers(rows, prefix=f"ablation/{variant}/")
        tracker.log_table("ablation", self.table)
        if self.per_layer:  # the per-layer c_l: their norms and (null space) alignment ρ
            series = {"norm": {l: float(np.linalg.norm(v)) for l, v in self.per_layer.items()}}
            rho = self.ablation_report.get("rho_per_layer")
            if rho:
                series["rho"] = {int(l): float(v) for l, v in rho.items()}
            tracker.log_series("nullspace" if self.kind == "nullspace" else "direction", series)


class _Ablation(Study):
    """Remove a subspace at ``intervention.layers`` next to a random one of the same size."""

    reads = ("intervention.layers", "intervention.position", "intervention.ablation",
             "intervention.use_cache", "direction", "nullspace")

    def run(self, ctx: JobContext) -> AblationResult:
        spec, kind, icfg = ctx.spec, self.name, ctx.spec.intervention
        fit = obtain_direction(ctx, ctx.edit_layers())
        layers = tuple(fit.steer_layers)
        report, bases, names = _bases(spec, kind, ctx.loaded, fit)
        ablation = SubspaceAblation(bases=tuple(b.astype(np.float32) for b in bases), layers=layers,
                                    position=icfg.position,
                                    means=_means(fit, layers, icfg.ablation),
                                    names=names)
        eval_set = ctx.prompt_set.subset(fit.eval_idx)
        logits = ctx.steered(eval_set, ablation, fit.base.take(fit.eval_idx))
        table = _variant_table(spec.metrics, logits, eval_set.labels, names)
        table, comparisons = ctx.paired(table, logits, eval_set.labels, "variant", min(layers))
        report.update(direction_raw_norm=fit.direction.meta.get("raw_norm"), layers=list(layers),
                      ablation=icfg.ablation, position=ablation.position,
                      truncation=final_deltas(table, names[1]),
                      random_control=final_deltas(table, names[2]))
        if kind == "nullspace":
            report["control_null"] = _control_null(ctx, fit, eval_set, layers, bases[0],
                                                   report["truncation"]["delta_ece"])
        summary = {"intervention": kind, "n_calibration": int(len(fit.cal_idx)),
                   "n_evaluation": int(len(fit.eval_idx)), "ablation": report, **comparisons}
        return AblationResult(ctx.report(fit.base.take(fit.eval_idx), eval_set), summary,
                              kind=kind, table=table, ablation_report=report,
                              per_layer=fit.per_layer)


def _control_null(ctx: JobContext, fit: Any, eval_set: Any, layers: tuple[int, ...],
                  basis: np.ndarray, truncated_delta_ece: float) -> dict[str, Any]:
    """The truncation against ``nullspace.n_control`` random subspaces of the same size,
    removed at the same layers: read from the last layer's residual when the removal is there,
    else through the blocks above it."""
    spec, n_control = ctx.spec, ctx.spec.nullspace.n_control
    if not n_control:
        return {"n_control": 0}
    last = ctx.num_layers - 1
    reason = null_skip_reason(spec.intervention.position, eval_set.is_cloze, list(layers) == [last])
    if reason:
        return {"n_control": n_control, "skipped": reason}
    bases = random_bases(basis.shape[0], basis.shape[1], n_control, spec.nullspace.seed + 1)
    means = _means(fit, layers, spec.intervention.ablation)
    if list(layers) == [last] and not eval_set.is_cloze:
        residual = fit.base.residuals[last][fit.eval_idx]
        logits = last_layer_truncated_logits(ctx.loaded, residual, eval_set.option_ids, bases,
                                             None if means is None else means[last], ctx.readout)
        plain = last_layer_logits(ctx.loaded, residual, eval_set.option_ids,
                                  np.zeros((1, basis.shape[0])), np.zeros(1),
                                  readout=ctx.readout)[0, 0]
    else:
        controls = SubspaceAblation(bases=tuple(b.astype(np.float32) for b in bases),
                                    layers=layers, position="last", means=means)
        final = ctx.steered(eval_set, controls)[:, :, -1]  # [1 + n_control, N, K]
        logits, plain = final[1:], final[0]
    out = subspace_null(logits, plain, eval_set.labels, truncated_delta_ece,
                        spec.metrics.n_bins, spec.metrics.binning)
    return {**out, "layers": list(layers)}


@register
class NullspaceStudy(_Ablation):
    """Truncate U_k, the unembedding's bottom-k left singular vectors (and report ĉ's ρ)."""

    name = "nullspace"
    description = "the unembedding's bottom-k subspace removed"


@register
class DirectionAblateStudy(_Ablation):
    """Remove the component along ĉ."""

    name = "direction_ablate"
    description = "the component along c_hat removed"
