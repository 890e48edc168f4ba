"""``intervention=steering``: fit ĉ on the calibration split, add η·ĉ, measure the evaluation split.

Outputs (besides the probe job's files, computed on the evaluation part): ``steering.csv`` (one
row per η and layer), ``direction.safetensors`` + ``direction.json`` (and the method's own files,
e.g. the gradient fit's loss curve), ``null.csv`` (the random-direction null), ``baselines.csv``,
``effects.csv`` (what ĉ does: T(η), the KL it leaves, ĉ without its top or massive coordinates),
``eta_curves.png`` and ``steered_ece.png``. The unsteered probe comes from
:mod:`calibrate.engine.cache`, so a sweep over η neither reloads the model (same process) nor
redoes the probe (any process).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from calibrate.config.spec import JobSpec, eta_edit_ratio
from calibrate.core.deltas import steering_table
from calibrate.core.direction import Direction
from calibrate.core.effects import (
    coordinate_shares,
    effect,
    log_probs,
    match_scales,
    temperature_equivalent,
)
from calibrate.core.posthoc import baseline_table, baselines_at
from calibrate.core.random_null import (
    direction_null,
    final_metrics,
    matched_null,
    null_skip_reason,
    null_vectors,
)
from calibrate.directions import get_method
from calibrate.directions.files import save_direction
from calibrate.directions.fit import obtain_direction
from calibrate.engine.edits import DirectionSweep, Steering, SteeringError, residual_norms
from calibrate.engine.last_layer import LastLayerReader
from calibrate.engine.probe import ProbeResult
from calibrate.io import results
from calibrate.io.track import Tracker
from calibrate.studies.baselines import BASELINES_FILE
from calibrate.studies.job_context import JobContext
from calibrate.studies.study import Study, StudyResult, register

LOG = logging.getLogger("calibrate")
STEERING_FILE = "steering.csv"
NULL_FILE = "null.csv"
FILES = (STEERING_FILE, "direction.safetensors", "direction.json", "eta_curves.png",
         "steered_ece.png", "gradient_fit.csv", "gradient_fit.png")
DIRECTION_SUMMARY = ("method", "layers", "raw_norm", "dataset", "cross_model_transfer",
                     "cosine_to_direction", "cosine_layer_diff", "null_space_rho", "eta_fit",
                     "fit_prompt", "prompt_transfer", "loaded_norm")
STEERED = ("accuracy", "ece", "mce")
EFFECT_SUMMARY = ("kl", "mean_abs_delta_confidence", "temperature", "residual_kl")
EFFECTS_FILE = "effects.csv"
NULL_SUMMARY = ("n_random", "null_delta_ece_median", "p_value_ece", "p_value_ece_two_sided",
                "c_hat_effect", "null_effect_median", "matched_delta_ece_median",
                "p_matched_ece", "p_matched_ece_two_sided", "n_matched")
DELTAS = ("delta_accuracy", "delta_ece", "delta_mce", "changed", "delta_ece_lo", "delta_ece_hi",
          "significant_ece", "p_ece", "p_adjusted_ece", "significant_adjusted_ece")


@dataclass
class SteeringResult(StudyResult):
    """ĉ, the steering table (one row per η and layer, on the evaluation split) and the
    unsteered evaluation report."""

    direction: Direction | None = None
    table: pd.DataFrame | None = None
    etas: tuple[float, ...] = ()
    eta_scale: str | None = None  # the unit of eta: absolute | residual_norm
    plots_on: bool = True  # output.plots: also the method's own figures
    null: pd.DataFrame | None = None  # the random-direction null, one row per η ≠ 0
    baselines: pd.DataFrame | None = None  # post-hoc baselines per layer, same split
    null_draws: pd.DataFrame | None = None  # each random direction's matched multiple of eta
    null_vectors: np.ndarray | None = None  # ĉ then the random directions of the null
    effects: pd.DataFrame | None = None  # per variant and η: effect, T(η), residual KL
    steer_layers: tuple[int, ...] = ()  # where η·ĉ is added (the headline names them)
    files: ClassVar[tuple[str, ...]] = (*FILES, NULL_FILE, BASELINES_FILE, EFFECTS_FILE)

    def write(self, job_dir: Path) -> None:
        results.write_csv(job_dir / STEERING_FILE, self.table)
        save_direction(self.direction, job_dir)
        method = self.direction.meta.get("method")
        if method in _method_names():
            get_method(method).write_files(self.direction, job_dir, self.plots_on)
        if self.null is not None and len(self.null):
            results.write_csv(job_dir / NULL_FILE, self.null)
        if self.baselines is not None:
            results.write_csv(job_dir / BASELINES_FILE, self.baselines)
        if self.effects is not None and len(self.effects):
            results.write_csv(job_dir / EFFECTS_FILE, self.effects)

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

    def tracker_summary(self) -> dict[str, Any]:
        flat = {"direction/raw_norm": self.direction.meta.get("raw_norm")}
        for eta, values in self.summary["steering"].items():
            for metric in ("delta_ece", "delta_mce", "delta_accuracy", "changed"):
                flat[f"steering/eta={eta}/{metric}"] = values[metric]
        return flat

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per η ≠ 0 (η = 0 alone: its own row): the steered final-layer values beside
        the unsteered reference, the null and the baselines."""
        summary, direction = self.summary, self.summary["direction"]
        head = {"intervention_layers": str(summary["intervention_layers"]),
                "eta_scale": summary["eta_scale"], "direction_method": direction.get("method"),
                "direction_layers": str(direction.get("layers")),
                "cosine_layer_diff": direction.get("cosine_layer_diff"),
                "null_space_rho": direction.get("null_space_rho"),
                "share_top_k": (direction.get("coordinates") or {}).get("share_top_k"),
                "share_massive": (direction.get("coordinates") or {}).get("share_massive")}
        head.update({f"{m}_ece": v.get("ece") for m, v in summary["baselines"].items()})
        null = {float(r["eta"]): r for r in summary["null"].get("per_eta") or []}
        rows = []
        for eta in [e for e in self.etas if e != 0.0] or [0.0]:
            values, row = summary["steering"].get(f"{eta:g}", {}), null.get(eta, {})
            rows.append({**head, "eta": eta, **{f"steered_{m}": values.get(m) for m in STEERED},
                         **{d: values.get(d) for d in DELTAS},
                         **{k: values.get(k) for k in EFFECT_SUMMARY},
                         **{k: row.get(k) for k in NULL_SUMMARY}})
        return rows

    def sweep_tables(self) -> dict[str, list[dict[str, Any]]]:
        """``steering_summary.csv`` of a sweep: the final layer's rows of steering.csv."""
        final = self.table[self.table["layer"] == self.table["layer"].max()]
        meta = self.direction.meta
        head = {"direction_method": meta.get("method"), "direction_layers": str(meta.get("layers")),
                "direction_dataset": meta.get("dataset")}
        return {"steering_summary": [{**head, **row} for row in final.to_dict("records")]}

    def headline(self) -> list[str]:
        lines = [f"  {steering_label(self.direction.meta, self.steer_layers, self.eta_scale)}"]
        for eta, v in self.summary["steering"].items():
            if float(eta) != 0.0:
                lines.append(f"  eta={eta}: accuracy {v['accuracy']:.3f} ({v['delta_accuracy']:+.3f}), "
                             f"ECE {v['ece']:.4f} ({v['delta_ece']:+.4f}), MCE {v['mce']:.4f} "
                             f"({v['delta_mce']:+.4f})")
        return lines


def steering_label(meta: Mapping[str, Any], steer_layers: Sequence[int],
                   eta_scale: str | None) -> str:
    """What a steering job did, in one line: the direction's method, the layers it was fit on
    and its data, the layers it is added at and the unit of η."""
    unit = ("x the mean residual norm at the edited layer" if eta_scale == "residual_norm"
            else "absolute (x a unit c_hat)")
    fit_on = meta.get("layers")
    where = f" from layers {list(fit_on)}" if isinstance(fit_on, (list, tuple)) else ""
    data = f" on {meta['dataset']}" if meta.get("dataset") else ""
    return (f"steering: c_hat by {meta.get('method', '?')}{where}{data}, added at layer(s) "
            f"{list(steer_layers)}; eta {unit}")


def _method_names() -> set[str]:
    from calibrate.directions import METHODS

    return set(METHODS)


@register
class SteeringStudy(Study):
    """η·ĉ added at ``intervention.layers``; every η of the job on one evaluation split."""

    name = "steering"
    reads = ("eta", "intervention.layers", "intervention.position", "intervention.eta_scale",
             "intervention.use_cache", "direction", "baselines", "nullspace.k",
             "nullspace.fraction")
    description = "eta * c_hat added to the residual"

    def run(self, ctx: JobContext) -> SteeringResult:
        spec = ctx.spec
        fit = obtain_direction(ctx, ctx.edit_layers())
        layers, base, cal = fit.steer_layers, fit.base, fit.cal_idx
        scale = None
        if spec.intervention.eta_scale == "residual_norm":
            scale = residual_norms({l: base.residuals[l][cal] for l in layers}, layers)
        etas, eta_fit = _etas(spec, fit.direction)
        _check_edit_size(spec, etas, base, cal, layers, scale)
        steering = Steering(fit.direction.vector, tuple(layers), etas,
                            spec.intervention.position, scale)
        eval_set = ctx.prompt_set.subset(fit.eval_idx)
        logits, null, null_note = _steer_with_null(ctx, fit, eval_set, steering)
        null_draws = null_note.pop("draws", None)
        null_vectors_used = null_note.pop("vectors", None)
        reader = null_note.pop("reader", None)
        table = steering_table(logits, eval_set.labels, list(etas), spec.metrics.n_bins,
                               spec.metrics.binning, 0)
        table, comparisons = ctx.paired(table, logits, eval_set.labels, "eta", min(layers))
        baselines = baseline_table(base.option_logits, base.labels, cal, fit.eval_idx,
                                   spec.baselines, spec.metrics.n_bins, spec.metrics.binning,
                                   paired=spec.metrics, tested_layer=max(layers))
        coordinates = coordinate_shares(fit.direction.vector, base.residuals[max(layers)][cal],
                                        spec.direction.coordinates.top_k,
                                        spec.direction.coordinates.massive_ratio)
        effects = _effects(ctx, fit, eval_set, steering, logits, coordinates, reader)
        meta = fit.direction.meta
        meta.update(intervention_layers=layers, position=steering.position,
                    eta_scale=spec.intervention.eta_scale, layer_scale=scale,
                    config_hash=spec.identity)
        direction = {k: meta.get(k) for k in DIRECTION_SUMMARY}
        direction["coordinates"] = {k: v for k, v in coordinates.items()
                                    if not k.startswith("without")}
        summary = {"intervention": self.name, "etas": list(etas),
                   "intervention_layers": list(layers), "eta_scale": meta["eta_scale"],
                   "position": steering.position, "n_calibration": int(len(cal)),
                   "n_evaluation": int(len(fit.eval_idx)), "direction": direction,
                   "steering": steering_summary(table, effects), **comparisons,
                   "null": null_note,
                   "baselines": baselines_at(baselines, max(layers)), "baselines_layer": max(layers)}
        if eta_fit is not None:
            summary["eta_fit"] = eta_fit
        return SteeringResult(ctx.report(base.take(fit.eval_idx), eval_set), summary,
                              direction=fit.direction, table=table, etas=etas,
                              eta_scale=spec.intervention.eta_scale, null=null,
                              baselines=baselines, plots_on=spec.output.plots,
                              null_draws=null_draws, null_vectors=null_vectors_used,
                              effects=effects, steer_layers=tuple(int(x) for x in layers))


def _etas(spec: JobSpec, direction: Direction) -> tuple[tuple[float, ...], float | None]:
    """The job's η values, with ``eta=fit`` resolved to the direction's fitted norm in the job's
    unit (``eta_fit`` / the fit layer's mean residual norm with ``residual_norm``)."""
    if not spec.eta_fit:
        return spec.etas, None
    meta = direction.meta
    if meta.get("eta_fit") is None:
        raise SteeringError(f"eta=fit: the {meta.get('method')} direction has no fitted norm; "
                            "accepted: eta=fit with direction.method=gradient, else numbers")
    value = float(meta["eta_fit"])
    if spec.intervention.eta_scale == "residual_norm":
        value /= float(meta["residual_scale"])
    if value == 0.0:
        LOG.warning("eta=fit: the gradient fit did not improve its held-out objective (fitted "
                    "norm 0), so fit adds no eta")
    etas = spec.etas if value in spec.etas else (*spec.etas, value)
    return etas, value


def _effects(ctx: JobContext, fit: Any, eval_set: Any, steering: Steering, logits: np.ndarray,
             coordinates: dict[str, Any], reader: LastLayerReader | None) -> pd.DataFrame:
    """Per variant (ĉ, and with ``direction.coordinates.steer_zeroed`` ĉ without its top
    coordinates and without the massive ones) and η ≠ 0, at the last layer: ΔECE, Δaccuracy
    against η = 0, the mean KL and |Δconfidence| to the unsteered output, and the temperature
    T(η) that best reproduces the steered option distribution from the unsteered scores with
    the KL left over (``baselines.log_t_bounds``)."""
    spec, etas = ctx.spec, steering.etas
    variants = {"c_hat": logits[:, :, -1]}  # [E, N, K]
    zeroed = {"without_top_k": coordinates["without_top_k"]}
    if coordinates["massive_coordinates"]:
        zeroed["without_massive"] = coordinates["without_massive"]
    if spec.direction.coordinates.steer_zeroed:
        vectors = np.stack(list(zeroed.values()))
        last = ctx.num_layers - 1
        if reader is None and ctx.reads_last_layer(eval_set, steering):
            reader = LastLayerReader(ctx.loaded, fit.base.residuals[last][fit.eval_idx],
                                     eval_set.option_ids, ctx.readout)
        if reader is not None:
            swept = reader.logits(vectors, np.outer(np.ones(len(vectors)),
                                                    np.asarray(etas) * steering.scale(last)))
        else:
            every = ctx.steered(eval_set, DirectionSweep(vectors, steering.layers, etas,
                                                         steering.position,
                                                         steering.layer_scale))[:, :, -1]
            swept = every.reshape(len(vectors), len(etas), *every.shape[1:])
        variants.update(zip(zeroed, swept))
    m, bounds = spec.metrics, spec.baselines.log_t_bounds
    unsteered = variants["c_hat"][0]
    labels = eval_set.labels
    rows = []
    for name, scores in variants.items():
        values = final_metrics(scores, labels, m.n_bins, m.binning)  # [E]
        for e, eta in enumerate(etas):
            if eta == 0.0:
                continue
            fitted = temperature_equivalent(unsteered, scores[e], bounds)
            rows.append({"variant": name, "eta": eta,
                         "delta_ece": float(values["ece"][e] - values["ece"][0]),
                         "delta_accuracy": float(values["accuracy"][e] - values["accuracy"][0]),
                         "kl": fitted["kl"],
                         "mean_abs_delta_confidence": float(effect(scores[e], unsteered,
                                                                   "confidence")),
                         "temperature": fitted["temperature"],
                         "residual_kl": fitted["residual_kl"]})
    return pd.DataFrame(rows)


def _check_edit_size(spec: JobSpec, etas: Sequence[float], base: ProbeResult,
                     cal_idx: np.ndarray, layers: Sequence[int],
                     scale: Mapping[int, float] | None) -> None:
    """Refuse an edit that overflows the float32 read; warn when it dwarfs the residual, or
    when it is too small a fraction of it to move the output (naming the unit that would)."""
    limit, tiny = spec.checks.edit_ratio_warn, spec.checks.edit_ratio_tiny
    largest = max(abs(e) for e in etas)
    for layer in layers:
        norm = float(np.linalg.norm(base.residuals[layer][cal_idx], axis=-1).mean())
        edit = largest * (scale or {}).get(layer, 1.0)
        if not math.isfinite((norm + edit) ** 2):
            raise SteeringError(f"eta={largest:g} adds an edit of norm {edit:.3g} at layer {layer}, "
                                f"whose float32 read overflows (mean residual norm {norm:.4g}); "
                                "accepted: an eta whose edit stays below ~1e19")
        ratio = eta_edit_ratio(tuple(etas), (scale or {}).get(layer), norm)
        if limit and ratio > limit:
            LOG.warning("eta=%g adds an edit %.3g times the mean residual norm (%.4g) at layer %d "
                        "(checks.edit_ratio_warn=%g): the model's output is swamped; consider "
                        "intervention.eta_scale=residual_norm or a smaller eta",
                        largest, ratio, norm, layer, limit)
        if tiny and largest > 0 and ratio < tiny:
            hint = ("eta is in multiples of that norm (intervention.eta_scale=residual_norm): "
                    "raise it" if scale else
                    f"eta is absolute; with intervention.eta_scale=residual_norm (eta in "
                    f"multiples of that norm) this edit is eta={ratio:.3g}")
            LOG.warning("eta=%g adds an edit only %.3g times the mean residual norm (%.4g) at "
                        "layer %d (checks.edit_ratio_tiny=%g): too small to move the output; %s",
                        largest, ratio, norm, layer, tiny, hint)


def _steer_with_null(ctx: JobContext, fit: Any, eval_set: Any, steering: Steering
                     ) -> tuple[np.ndarray, pd.DataFrame | None, dict[str, Any]]:
    """ĉ's steered scores [E, N, L+1, K] and the null of random directions steered the same way
    (``direction.null``: isotropic or from the residual covariance at the highest edited layer
    on the calibration split; as many as :meth:`DirectionSettings.random_count` says).

    At the last layer with one token per option both are read from the probe's last residual
    (no forward pass, :class:`LastLayerReader`), and each random direction is also steered at
    the η that matches ĉ's effect (``direction.match``). Elsewhere ĉ is the first direction of
    one sweep that also runs the random ones, so the prompts run once for both (no matching:
    it would need passes per trial η).
    """
    spec, settings, etas = ctx.spec, ctx.spec.direction, steering.etas
    layers, last = list(steering.layers), ctx.num_layers - 1
    base = fit.base.take(fit.eval_idx)
    reads_only = ctx.reads_last_layer(eval_set, steering) and last in base.residuals
    n_random = settings.random_count(reads_only)
    if not n_random or len(etas) < 2:
        return ctx.steered(eval_set, steering, base), None, {"n_random": 0}
    reason = null_skip_reason(steering.position, eval_set.is_cloze, layers == [last])
    if reason:
        LOG.info("random-direction null skipped: %s", reason)
        return ctx.steered(eval_set, steering, base), None, {"n_random": n_random,
                                                            "skipped": reason}
    residuals = fit.base.residuals[max(layers)][fit.cal_idx] \
        if settings.null == "covariance" else None
    vectors = null_vectors(fit.direction.vector, n_random, settings.seed + 1, settings.null,
                           residuals)
    kind = "kl" if settings.match == "none" else settings.match
    m = spec.metrics
    note: dict[str, Any] = {"n_random": n_random, "null": settings.null, "layers": layers,
                            "p_resolution": 1.0 / (1 + n_random), "effect": kind,
                            "path": "read" if reads_only else "forward"}
    if reads_only:
        logits = ctx.steered(eval_set, steering, base)
        reader = LastLayerReader(ctx.loaded, base.residuals[last], eval_set.option_ids,
                                 ctx.readout)
        scale = steering.scale(last)
        swept = reader.logits(vectors, np.outer(np.ones(len(vectors)), np.asarray(etas) * scale))
        table = direction_null(swept, eval_set.labels, etas, m.n_bins, m.binning, kind)
        if settings.match != "none":
            draws: list[dict[str, Any]] = []
            table = _matched(table, reader, vectors[1:], swept, etas, scale, eval_set.labels,
                             settings, m, draws)
            note["draws"] = pd.DataFrame(draws)
        else:
            note["matched_skipped"] = "direction.match=none"
    else:
        every = ctx.steered(eval_set, DirectionSweep(vectors, tuple(layers), etas, "last",
                                                     steering.layer_scale))
        logits, final = every[:len(etas)], every[:, :, -1]  # ĉ's etas come first
        swept = final.reshape(len(vectors), len(etas), *final.shape[1:])
        table = direction_null(swept, eval_set.labels, etas, m.n_bins, m.binning, kind)
        note["matched_skipped"] = ("the edit is below the last layer or needs a pass per trial "
                                   "eta (matching is done where the null needs no forward pass)")
    note["per_eta"] = table.to_dict("records")
    note["vectors"] = vectors
    if reads_only:
        note["reader"] = reader
    return logits, table, note


def _matched(table: pd.DataFrame, reader: LastLayerReader, randoms: np.ndarray,
             swept: np.ndarray, etas: Sequence[float], scale: float, labels: np.ndarray,
             settings: Any, m: Any, draws: list[dict[str, Any]]) -> pd.DataFrame:
    """Each random direction steered at the η whose effect (``direction.match``) equals ĉ's at
    each η ≠ 0; the matched null's band and p-values beside the equal-norm ones. ``draws``
    receives each direction's matched multiple of η."""
    zero = list(etas).index(0.0)
    unsteered = swept[0, zero]
    unsteered_log = log_probs(unsteered)
    read = reader.sweep(randoms)  # each direction's products once, for every trial eta
    rows = []
    for row in table.to_dict("records"):
        e = list(etas).index(row["eta"])
        eta = float(etas[e]) * scale
        target = float(effect(swept[0, e], unsteered, settings.match))

        def effect_of(multiple: np.ndarray, which: np.ndarray, eta: float = eta) -> np.ndarray:
            return effect(read(which, multiple * eta), unsteered, settings.match, unsteered_log)

        multiples = match_scales(effect_of, target, len(randoms), settings.match_max_factor,
                                 settings.match_tol)
        matched = np.full((len(randoms), *unsteered.shape), np.nan)
        ok = ~np.isnan(multiples)
        if ok.any():
            matched[ok] = read(np.flatnonzero(ok), multiples[ok] * eta)
        draws.extend({"eta": row["eta"], "direction": d + 1, "matched_multiple": float(x)}
                     for d, x in enumerate(multiples))
        rows.append({**row, **matched_null(row["c_hat_delta_ece"], matched, unsteered,
                                           multiples, labels, m.n_bins, m.binning)})
    return pd.DataFrame(rows)


def steering_summary(table: pd.DataFrame, effects: pd.DataFrame | None = None) -> dict[str, Any]:
    """Final-layer figures per eta, for metrics.json and the tracker summary (with ĉ's effect
    and temperature equivalent from ``effects``)."""
    last = table[table["layer"] == table["layer"].max()]
    cols = ["accuracy", "ece", "mce", "delta_accuracy", "delta_ece", "delta_mce", "changed",
            "delta_ece_lo", "delta_ece_hi", "significant_ece", "delta_accuracy_lo",
            "delta_accuracy_hi", "p_ece", "p_adjusted_ece", "significant_adjusted_ece",
            "p_accuracy", "p_adjusted_accuracy", "significant_adjusted_accuracy"]
    out = {f"{eta:g}": {c: (bool(row[c]) if c.startswith("significant") else float(row[c]))
                        for c in cols if c in row}
           for eta, row in zip(last["eta"], last.to_dict("records"))}
    if effects is not None and len(effects):
        own = effects[effects["variant"] == "c_hat"]
        for row in own.to_dict("records"):
            out[f"{row['eta']:g}"].update({k: float(row[k]) for k in EFFECT_SUMMARY})
    return out
