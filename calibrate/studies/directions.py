"""Calibration directions for a job: a registry of fitting methods, and the fit of ĉ on the
calibration split (of this dataset or of ``direction.source``), or its load from a file.

A method is a callable that receives a :class:`FitRequest` — the job context, the prompts and
calibration rows to fit on, the layers and seed — and returns a unit
:class:`~calibrate.core.direction.Direction`. It may read cached residuals
(:meth:`FitRequest.residuals`) or run the model itself through ``request.ctx``::

    @direction_method("my_method")
    def my_method(request: FitRequest) -> Direction:
        residuals = request.residuals()
        ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from calibrate.config import CONF_DIR
from calibrate.core.direction import (
    Direction,
    DirectionError,
    check_compatible,
    check_layers,
    fit_direction,
    load_direction,
    per_layer_directions,
    random_direction,
    residual_layers_for,
)
from calibrate.engine.probe import ProbeResult
from calibrate.engine.steer import check_steering
from calibrate.studies.context import JobContext
from calibrate.tasks.prompts import PromptSet, build_prompts


@dataclass
class FitRequest:
    """What a direction method is given."""

    ctx: JobContext
    prompt_set: PromptSet   # the prompts to fit on (the job's, or direction.source's)
    cal_idx: np.ndarray     # the calibration rows of ``prompt_set``
    layers: list[int]       # direction.layers, resolved
    seed: int
    keep: list[int]         # residual layers a probe keeps (the fit's and the steering layers)

    def residuals(self) -> dict[int, np.ndarray]:
        """Last-position residuals ``{layer: [n_calibration, hidden]}`` the fit needs."""
        result = self.ctx.probe(self.prompt_set, self.keep)
        return {l: result.residuals[l][self.cal_idx] for l in residual_layers_for(self.layers)}


DirectionMethod = Callable[[FitRequest], Direction]
DIRECTION_METHODS: dict[str, DirectionMethod] = {}


def direction_method(name: str) -> Callable[[DirectionMethod], DirectionMethod]:
    """Decorator: register a direction fitting method under ``name``."""
    def register(method: DirectionMethod) -> DirectionMethod:
        DIRECTION_METHODS[name] = method
        return method
    return register


@direction_method("layer_diff")
def layer_diff(request: FitRequest) -> Direction:
    """The paper's ĉ: the mean of the normalised per-example layer differences."""
    return fit_direction(request.residuals(), request.layers, "layer_diff", request.seed)


@direction_method("mean_diff")
def mean_diff(request: FitRequest) -> Direction:
    """The mean layer difference, normalised once at the end."""
    return fit_direction(request.residuals(), request.layers, "mean_diff", request.seed)


@direction_method("random")
def random(request: FitRequest) -> Direction:
    """A seeded random unit vector: the control."""
    return random_direction(request.ctx.loaded.adapter.unembed_weight.shape[1], request.seed)


def steer_layers(ctx: JobContext) -> list[int]:
    """``intervention.layers`` resolved (default: the last layer) and checked."""
    icfg = ctx.spec.intervention
    layers = list(icfg.layers or [ctx.num_layers - 1])
    return check_steering(layers, ctx.num_layers, icfg.position, icfg.eta_scale)


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


@dataclass
class Fitted:
    """ĉ fit on the calibration split, and the unsteered probe of the job's prompts."""

    direction: Direction
    base: ProbeResult  # all of the job's examples, with the residuals of the fit/steer layers
    cal_idx: np.ndarray
    eval_idx: np.ndarray
    per_layer: dict[int, np.ndarray]  # the per-layer c_l means (empty when loaded or random)
    steer_layers: list[int]


def _direction_layers(ctx: JobContext, fit_set: PromptSet, fit_cal: np.ndarray) -> list[int]:
    layers = ctx.spec.direction.layers
    if layers == "auto":  # the correction phase detected on the calibration rows
        from calibrate.core.phases import find_phases

        phases = find_phases(ctx.measure(ctx.probe(fit_set).take(fit_cal)), ctx.spec.phases)
        if not phases.correction_layers:
            raise DirectionError(f"direction.layers=auto: {phases.note}; set direction.layers")
        layers = phases.correction_layers
    return check_layers(layers, ctx.num_layers)


def _fit_source(ctx: JobContext) -> tuple[PromptSet, np.ndarray, Any]:
    """The prompts, calibration rows and dataset config ĉ is fit on."""
    spec, dset = ctx.spec, ctx.spec.direction
    if not dset.source:
        return ctx.prompt_set, ctx.split()[0], spec.dataset
    from calibrate.tasks.data import load_records
    from calibrate.tasks.dataset_config import DatasetConfig

    source = DatasetConfig.from_mapping(source_dataset_config(dset.source, spec.seed,
                                                              dset.source_limit))
    fit_set = build_prompts(load_records(source, spec.cache_dir), source, ctx.loaded.tokenizer)
    return fit_set, ctx.split(len(fit_set.prompts))[0], source


def _loaded_direction(ctx: JobContext) -> Direction:
    dset, loaded = ctx.spec.direction, ctx.loaded
    return check_compatible(load_direction(dset.path), loaded.adapter.unembed_weight.shape[1],
                            loaded.unembed_hash, loaded.name, dset.allow_cross_model)


def obtain_direction(ctx: JobContext) -> Fitted:
    """Fit ĉ with ``direction.method`` on the calibration split, or load ``direction.path``."""
    dset = ctx.spec.direction
    cal_idx, eval_idx = ctx.split()
    steer = steer_layers(ctx)
    if dset.path:
        return Fitted(_loaded_direction(ctx), ctx.probe(keep=steer), cal_idx, eval_idx, {}, steer)
    fit_set, fit_cal, fit_cfg = _fit_source(ctx)
    layers = _direction_layers(ctx, fit_set, fit_cal)
    keep = sorted(set(residual_layers_for(layers)) | set(steer))
    # One probe pass serves the metrics and the fit when both use the job's prompts.
    base = ctx.probe(keep=keep if fit_set is ctx.prompt_set else steer)
    method = DIRECTION_METHODS.get(dset.method)
    if method is None:
        raise DirectionError(f"direction.method={dset.method!r}; accepted: "
                             f"{', '.join(DIRECTION_METHODS)}")
    request = FitRequest(ctx, fit_set, fit_cal, layers, dset.seed, keep)
    direction = method(request)
    direction.meta.update(model=ctx.loaded.name, unembed_hash=ctx.loaded.unembed_hash,
                          split="calibration", n_examples=int(len(fit_cal)),
                          dataset=fit_cfg.name, dataset_split=fit_cfg.split)
    per_layer = {}
    if dset.method in ("layer_diff", "mean_diff"):  # the per-layer c_l behind ĉ
        per_layer = per_layer_directions(request.residuals(), layers, dset.method)
    return Fitted(direction, base, cal_idx, eval_idx, per_layer, steer)
