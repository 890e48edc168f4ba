"""The steering job: fit c_hat on a calibration split, add eta * c_hat, measure the evaluation split.

Outputs (besides the probe job's files, computed on the evaluation part): ``steering.csv`` (one
row per eta and layer), ``direction.safetensors`` + ``direction.json``, ``eta_curves.png`` and
``steered_ece.png``. The unsteered probe comes from :mod:`calibrate.probe_cache`, so a sweep over
eta neither reloads the model (same process) nor redoes the probe (any process).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from calibrate import results
from calibrate.direction import (Direction, DirectionError, check_compatible, check_layers,
                                 fit_direction, load_direction, per_layer_directions,
                                 residual_layers_for, save_direction, split_indices)
from calibrate.models import LoadedModel
from calibrate.probe import ProbeResult, ProbeSettings
from calibrate.prompts import PromptSet, build_prompts
from calibrate.scoring import score_steered
from calibrate.steer import Steering, check_steering, residual_norms, steering_table
from calibrate.spec import JobSpec, eta_edit_ratio

LOG = logging.getLogger("calibrate")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STEERING_FILE = "steering.csv"
FILES = [STEERING_FILE, "direction.safetensors", "direction.json", "eta_curves.png", "steered_ece.png"]


def source_dataset_config(name: str, seed: int, limit: int | None) -> dict[str, Any]:
    """A dataset config by name, resolved as the CLI would (for fitting on another dataset)."""
    path = CONF_DIR / "dataset" / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise DirectionError(f"direction.source={name!r}; accepted: {', '.join(choices)}")
    merged = OmegaConf.create({"seed": seed, "dataset": OmegaConf.load(path)})
    out = OmegaConf.to_container(merged, resolve=True)["dataset"]
    if limit is not None:
        out["limit"] = limit
    return out


class DirectionJob:
    """State shared by the steps of one steering job."""

    def __init__(self, spec: JobSpec, loaded: LoadedModel, probe) -> None:
        self.cfg, self.loaded, self.probe = spec.config, loaded, probe  # probe(prompt_set, keep)
        self.num_layers = loaded.adapter.num_blocks + 1
        icfg = spec.intervention
        layers = icfg.get("layers") or [self.num_layers - 1]
        self.icfg = icfg
        self.steer_layers = check_steering(layers, self.num_layers, icfg["position"],
                                           icfg.get("eta_scale", "absolute"))

    def direction_layers(self, auto_table: pd.DataFrame | None) -> list[int]:
        """``direction.layers`` resolved (``auto``: the detected correction phase)."""
        layers = self.cfg["direction"]["layers"]
        if layers == "auto":
            from calibrate.phases import find_phases

            phases = find_phases(auto_table, self.cfg["phases"])
            if not phases.correction_layers:
                raise DirectionError(f"direction.layers=auto: {phases.note}; set direction.layers")
            layers = phases.correction_layers
        return check_layers(layers, self.num_layers)

    def keep_layers(self, fit_layers: Sequence[int]) -> list[int]:
        """Residual layers the probe must return: the fit's and the steering layers."""
        return sorted(set(residual_layers_for(fit_layers)) | set(self.steer_layers))

    def fit(self, prompt_set: PromptSet, cal_idx: np.ndarray, auto_table) -> Direction:
        """Fit c_hat on the calibration part of ``prompt_set`` (or load it from a file)."""
        dcfg = self.cfg["direction"]
        if dcfg.get("path"):
            direction = load_direction(dcfg["path"])
            return check_compatible(direction, self.loaded.adapter.unembed_weight.shape[1],
                                    self.loaded.unembed_hash, self.loaded.name,
                                    bool(dcfg.get("allow_cross_model")))
        layers = self.direction_layers(auto_table)
        result = self.probe(prompt_set, self.keep_layers(layers))
        residuals = {l: result.residuals[l][cal_idx] for l in residual_layers_for(layers)}
        direction = fit_direction(residuals, layers, dcfg["method"], int(dcfg["seed"]))
        direction.meta.update(model=self.loaded.name, unembed_hash=self.loaded.unembed_hash,
                              split="calibration", n_examples=int(len(cal_idx)))
        return direction


def _split(n: int, dcfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    return split_indices(n, float(dcfg["calibration_fraction"]), int(dcfg["seed"]))


@dataclass
class Fitted:
    """A direction fit on the calibration split, and the probe it came from."""

    job: DirectionJob
    direction: Direction
    base: ProbeResult  # unsteered probe of all examples (residuals of the fit/steer layers)
    cal_idx: np.ndarray
    eval_idx: np.ndarray
    per_layer: dict[int, np.ndarray]  # the per-layer c_l means (empty when loaded from a file)


def obtain_direction(spec: JobSpec, loaded: LoadedModel, prompt_set: PromptSet,
                     probe, measure) -> Fitted:
    """Fit c_hat on the calibration split (this dataset or ``direction.source``) or load it."""
    cfg = spec.config
    job = DirectionJob(spec, loaded, probe)
    dcfg = cfg["direction"]
    cal_idx, eval_idx = _split(len(prompt_set.prompts), dcfg)
    fits_here = not dcfg.get("source") and not dcfg.get("path") and dcfg["layers"] != "auto"
    # One probe pass serves both the metrics and the fit when the fit layers are known upfront.
    keep = job.keep_layers(job.direction_layers(None)) if fits_here else job.steer_layers
    base = probe(prompt_set, keep)
    fit_set, fit_cal, fit_name = prompt_set, cal_idx, cfg["dataset"]
    if dcfg.get("source"):
        from calibrate.data import load_records

        fit_name = source_dataset_config(dcfg["source"], int(cfg["seed"]), dcfg.get("source_limit"))
        fit_set = build_prompts(load_records(fit_name, cfg.get("cache_dir")), fit_name, loaded.tokenizer)
        fit_cal, _ = _split(len(fit_set.prompts), dcfg)
    auto_table = None
    if dcfg["layers"] == "auto" and not dcfg.get("path"):
        auto_table = measure(probe(fit_set, ()).take(fit_cal))
    direction = job.fit(fit_set, fit_cal, auto_table)
    per_layer = {}
    if not dcfg.get("path"):
        direction.meta.update(dataset=fit_name["name"], dataset_split=fit_name.get("split"))
        layers = direction.meta.get("layers") or []
        fitted = probe(fit_set, job.keep_layers(layers)) if layers else None
        if fitted is not None and dcfg["method"] != "random":
            per_layer = per_layer_directions({l: v[fit_cal] for l, v in fitted.residuals.items()},
                                             layers, dcfg["method"])
    return Fitted(job, direction, base, cal_idx, eval_idx, per_layer)


def run_direction(spec: JobSpec, loaded: LoadedModel, prompt_set: PromptSet,
                  probe, measure, settings: ProbeSettings) -> dict[str, Any]:
    """Everything but writing: returns tables, arrays and metadata of a steering job."""
    cfg = spec.config
    fit = obtain_direction(spec, loaded, prompt_set, probe, measure)
    job, direction, base, cal_idx, eval_idx = fit.job, fit.direction, fit.base, fit.cal_idx, fit.eval_idx
    scale = None
    if job.icfg["eta_scale"] == "residual_norm":
        scale = residual_norms({l: base.residuals[l][cal_idx] for l in job.steer_layers},
                               job.steer_layers)
    etas = list(spec.etas)
    _warn_edit_ratio(spec, base, cal_idx, job.steer_layers, scale)
    steering = Steering(direction.vector, tuple(job.steer_layers), tuple(etas),
                        job.icfg["position"], scale)
    eval_set = prompt_set.subset(eval_idx)
    logits = score_steered(loaded, eval_set, steering, settings, bool(job.icfg.get("use_cache", True)))
    mcfg = cfg["metrics"]
    table = steering_table(logits, eval_set.labels, etas, int(mcfg["n_bins"]), str(mcfg["binning"]), 0)
    direction.meta.update(intervention_layers=job.steer_layers, position=steering.position,
                          eta_scale=job.icfg["eta_scale"], layer_scale=scale)
    return {"direction": direction, "steering": table, "eval_idx": eval_idx, "cal_idx": cal_idx,
            "base_eval": base.take(eval_idx), "steered_logits": logits, "eval_set": eval_set,
            "etas": etas}


def _warn_edit_ratio(spec: JobSpec, base: ProbeResult, cal_idx: np.ndarray,
                     layers: Sequence[int], scale: Mapping[int, float] | None) -> None:
    """Warn when the largest edit ‖η·ĉ‖ dwarfs the residual it is added to."""
    limit = float((spec.config.get("checks") or {}).get("edit_ratio_warn") or 0)
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


def steering_summary(table: pd.DataFrame) -> dict[str, Any]:
    """Final-layer figures per eta, for metrics.json and the tracker summary."""
    last = table[table["layer"] == table["layer"].max()]
    cols = ["accuracy", "ece", "mce", "delta_accuracy", "delta_ece", "delta_mce", "changed"]
    return {f"{eta:g}": {c: float(row[c]) for c in cols}
            for eta, row in zip(last["eta"], last.to_dict("records"))}


def write_steering_data(out: Mapping[str, Any], job_dir: Path) -> None:
    """Write steering.csv and the direction (safetensors + json)."""
    results.write_csv(job_dir / STEERING_FILE, out["steering"])
    save_direction(out["direction"], job_dir)


def plot_steering(out: Mapping[str, Any], job_dir: Path, title: str) -> dict[str, Path]:
    """The steering plots: final-layer metrics against eta, per-layer ECE for each eta."""
    from calibrate.plots import plot_eta_curves, plot_overlay

    table = out["steering"]
    per_eta = {f"eta={eta:g}": table[table["eta"] == eta] for eta in out["etas"]}
    return {
        "eta_curves": plot_eta_curves(table, job_dir / "eta_curves.png", f"{title}: steering"),
        "steered_ece": plot_overlay(per_eta, "ece", job_dir / "steered_ece.png",
                                    f"{title}: ECE per layer for each eta"),
    }
