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

Registered: ``layer_diff`` (the paper's), ``mean_diff``, ``random`` (the control), ``pca`` and
``probe`` (the representation-engineering family, :mod:`calibrate.core.direction_methods`) and
``gradient`` (a vector fit by gradient descent on a calibration objective,
:mod:`calibrate.studies.gradient`). Sign convention of every method: +η is meant to lower
confidence (reduce over-confidence), as layer_diff's ĉ does along the correction phase.

Every fitted direction's meta also records its cosine with layer_diff's ĉ fit on the same rows
(``cosine_layer_diff``) and its null-space alignment ρ = ||U_kᵀ ĉ|| (``null_space_rho``, k from
the ``nullspace`` group): what the methods are compared by, beside their steering results.
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


@direction_method("pca")
def pca(request: FitRequest) -> Direction:
    """First principal component of the per-example normalised layer differences, oriented
    along them (:func:`calibrate.core.direction_methods.pca_direction`)."""
    from calibrate.core.direction_methods import pca_direction

    return pca_direction(request.residuals(), request.layers)


def probe_settings(ctx: JobContext) -> dict[str, Any]:
    """``direction.probe``: ``layer`` (null: the last of direction.layers) and ``c`` (the
    inverse L2 strength of the logistic regression, sklearn's C)."""
    cfg = dict((ctx.spec.config.get("direction") or {}).get("probe") or {})
    unknown = sorted(set(cfg) - {"layer", "c"})
    if unknown:
        raise DirectionError(f"direction.probe has unknown keys {unknown}; accepted: layer, c")
    c = cfg.get("c", 1.0)
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
        raise DirectionError(f"direction.probe.c={c!r}; accepted: a number > 0")
    layer = cfg.get("layer")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)
                              or not 0 <= layer < ctx.num_layers):
        raise DirectionError(f"direction.probe.layer={layer!r}; accepted: null or a layer in "
                             f"0..{ctx.num_layers - 1}")
    return {"layer": layer, "c": float(c)}


@direction_method("probe")
def probe(request: FitRequest) -> Direction:
    """-w/||w|| of a logistic regression separating the calibration rows the model answers
    correctly (its unsteered final answer) from the others, on the residual at
    ``direction.probe.layer`` (:func:`calibrate.core.direction_methods.probe_direction`)."""
    from calibrate.core.direction_methods import probe_direction

    cfg = probe_settings(request.ctx)
    layer = cfg["layer"] if cfg["layer"] is not None else max(request.layers)
    result = request.ctx.probe(request.prompt_set, request.keep)
    cal = request.cal_idx
    correct = result.probs[cal, -1].argmax(-1) == result.labels[cal]
    return probe_direction(result.residuals[layer][cal], correct, layer, cfg["c"])


def gradient_layer(ctx: JobContext) -> int:
    """The layer the gradient vector is fit at: ``direction.gradient.layer``, else the last
    steering layer."""
    from calibrate.studies.gradient import gradient_settings

    layer = gradient_settings(ctx.spec.config.get("direction") or {}).layer
    return int(layer) if layer is not None else max(steer_layers(ctx))


@direction_method("gradient")
def gradient(request: FitRequest) -> Direction:
    """A vector fit by gradient descent with the model frozen (:mod:`calibrate.studies.gradient`)."""
    from calibrate.studies.gradient import fit_gradient, gradient_settings

    ctx = request.ctx
    settings = gradient_settings(ctx.spec.config.get("direction") or {})
    layer = gradient_layer(ctx)
    last = ctx.loaded.adapter.num_blocks
    residual = scores = None
    if layer == last:
        result = ctx.probe(request.prompt_set, request.keep)
        residual = result.residuals[last][request.cal_idx]
        scores = result.option_logits[request.cal_idx, -1]
    return fit_gradient(ctx.loaded, request.prompt_set, request.cal_idx, layer, residual,
                        settings, request.seed, scores,
                        prefix_reuse=ctx.settings.prefix_reuse).direction


def method_layers(ctx: JobContext, method: str) -> list[int]:
    """Residual layers a method needs kept beyond the fit's and the steering layers."""
    if method == "probe":
        layer = probe_settings(ctx)["layer"]
        return [] if layer is None else [layer]
    if method == "gradient":
        layer = gradient_layer(ctx)
        return [layer] if layer == ctx.loaded.adapter.num_blocks else []
    return []


def comparison_meta(ctx: JobContext, direction: Direction,
                    residuals: dict[int, np.ndarray], layers: list[int]) -> dict[str, Any]:
    """The direction's cosine with layer_diff's ĉ on the same rows and its null-space ρ."""
    import torch

    from calibrate.core import nullspace
    from calibrate.model.assets import cache_root

    out: dict[str, Any] = {}
    try:
        reference = fit_direction(residuals, layers, "layer_diff").vector
        out["cosine_layer_diff"] = float(direction.vector @ reference
                                         / max(np.linalg.norm(direction.vector), 1e-300))
    except DirectionError:  # the differences cancel out: no reference
        out["cosine_layer_diff"] = None
    ncfg = ctx.spec.nullspace
    weight = ctx.loaded.adapter.unembed_weight.detach().cpu()
    k = nullspace.resolve_k(weight.shape[1], ncfg.k, ncfg.fraction)
    basis, _ = nullspace.cached_null_space(weight, k, cache_root(ctx.spec.cache_dir))
    out["null_space_rho"] = nullspace.alignment(torch.as_tensor(direction.vector), basis)
    out["null_space_k"] = int(k)
    return out


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


def _own_style(ctx: JobContext) -> Any:
    """The job's prompt style (zero-shot when the spec has none)."""
    from calibrate.tasks.shots import PromptStyle

    return ctx.spec.prompt or PromptStyle()


def _fit_style(ctx: JobContext) -> Any:
    """The prompt style ĉ is fit in: ``direction.source_prompt`` over the job's ``prompt``."""
    from calibrate.tasks.shots import PromptStyle

    own = _own_style(ctx)
    raw = ctx.spec.direction.source_prompt
    if raw is None:
        return own
    return PromptStyle.from_mapping({"shots": own.shots, "chat_template": own.chat_template,
                                     "seed": own.seed, **raw}, DirectionError)


def _fit_source(ctx: JobContext) -> tuple[PromptSet, np.ndarray, Any, Any]:
    """The prompts, calibration rows, dataset config and prompt style ĉ is fit on.

    Another dataset (``direction.source``) is fit on its own calibration split. The job's
    dataset in another prompt style (``direction.source_prompt``) is fit on the job's own
    calibration records, which must then be the same records in both styles.
    """
    from calibrate.tasks.data import DatasetError
    from calibrate.tasks.dataset_config import DatasetConfig
    from calibrate.tasks.shots import load_with_exemplars

    spec, dset = ctx.spec, ctx.spec.direction
    own, style = _own_style(ctx), _fit_style(ctx)
    if not dset.source and style == own:
        return ctx.prompt_set, ctx.split()[0], spec.dataset, own
    source = spec.dataset if not dset.source else DatasetConfig.from_mapping(
        source_dataset_config(dset.source, spec.seed, dset.source_limit))
    try:
        records, exemplars = load_with_exemplars(source, style, spec.cache_dir)
    except DatasetError as err:
        raise DirectionError(f"direction.source_prompt: {err}") from err
    fit_set = build_prompts(records, source, ctx.loaded.tokenizer, style=style,
                            exemplars=exemplars)
    if dset.source:
        return fit_set, ctx.split(len(fit_set.prompts))[0], source, style
    evaluated, _ = load_with_exemplars(spec.dataset, own, spec.cache_dir)
    if list(evaluated) != list(records):
        raise DirectionError(
            f"direction.source_prompt={dict(dset.source_prompt)}: the job ({own.shots} shots) and "
            f"the fit ({style.shots} shots) would not see the same {spec.dataset.name} records "
            "(exemplars were taken out of the evaluated rows), so the fit could read evaluation "
            "rows; set dataset.limit below the split's size so exemplars come from rows neither "
            "evaluates")
    return fit_set, ctx.split()[0], spec.dataset, style


def gguf_direction(path: str, steer: list[int], model_type: str, allow_cross_model: bool) -> Direction:
    """A repeng control-vector GGUF as a unit direction (:mod:`calibrate.io.gguf`): its only
    vector, or the one at the last steering layer (repeng's block i is our layer i + 1). repeng
    signs a vector towards its positive examples; it is used as given (+η adds it)."""
    from calibrate.io.gguf import ControlVectorError, read_control_vector

    try:
        control = read_control_vector(path)
    except ControlVectorError as err:
        raise DirectionError(f"direction.path: {err}") from err
    layers = list(control.directions)
    layer = layers[0] if len(layers) == 1 else max(steer)
    if layer not in control.directions:
        raise DirectionError(f"direction.path={path!r} holds repeng vectors for layers {layers} "
                             f"(our numbering: repeng's block i is layer i + 1), none for the "
                             f"steering layer {layer}; set intervention.layers=[{layers[-1]}]")
    if control.model_hint != model_type and not allow_cross_model:
        raise DirectionError(f"direction.path={path!r} is a control vector for model type "
                             f"{control.model_hint!r}, not {model_type!r}; set "
                             "direction.allow_cross_model=true to apply it anyway")
    vector = control.directions[layer]
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise DirectionError(f"direction.path={path!r}: the vector of layer {layer} is zero")
    meta = {"method": "repeng_gguf", "source_file": str(path), "model_hint": control.model_hint,
            "gguf_layers": layers, "layers": [int(layer)], "raw_norm": norm,
            "hidden": int(vector.shape[0])}
    if control.model_hint != model_type:
        meta["cross_model_transfer"] = True
    return Direction(vector / norm, meta)


def _loaded_direction(ctx: JobContext, steer: list[int]) -> Direction:
    dset, loaded = ctx.spec.direction, ctx.loaded
    if str(dset.path).endswith(".gguf"):
        direction = gguf_direction(dset.path, steer, loaded.adapter.model_type,
                                   dset.allow_cross_model)
    else:
        direction = load_direction(dset.path)
    return check_compatible(direction, loaded.adapter.unembed_weight.shape[1],
                            loaded.unembed_hash, loaded.name, dset.allow_cross_model)


def obtain_direction(ctx: JobContext) -> Fitted:
    """Fit ĉ with ``direction.method`` on the calibration split, or load ``direction.path``."""
    dset = ctx.spec.direction
    cal_idx, eval_idx = ctx.split()
    steer = steer_layers(ctx)
    if dset.path:
        return Fitted(_loaded_direction(ctx, steer), ctx.probe(keep=steer), cal_idx, eval_idx, {},
                      steer)
    fit_set, fit_cal, fit_cfg, fit_style = _fit_source(ctx)
    layers = _direction_layers(ctx, fit_set, fit_cal)
    method = DIRECTION_METHODS.get(dset.method)
    if method is None:
        raise DirectionError(f"direction.method={dset.method!r}; accepted: "
                             f"{', '.join(DIRECTION_METHODS)}")
    keep = sorted(set(residual_layers_for(layers)) | set(steer)
                  | set(method_layers(ctx, dset.method)))
    # One probe pass serves the metrics and the fit when both use the job's prompts.
    base = ctx.probe(keep=keep if fit_set is ctx.prompt_set else steer)
    request = FitRequest(ctx, fit_set, fit_cal, layers, dset.seed, keep)
    direction = method(request)
    direction.meta.update(model=ctx.loaded.name, unembed_hash=ctx.loaded.unembed_hash,
                          split="calibration", n_examples=int(len(fit_cal)),
                          dataset=fit_cfg.name, dataset_split=fit_cfg.split,
                          fit_prompt={"shots": fit_style.shots,
                                      "chat_template": fit_style.chat_template},
                          prompt_transfer=fit_style != _own_style(ctx))
    direction.meta.update(comparison_meta(ctx, direction, request.residuals(), layers))
    per_layer = {}
    if dset.method in ("layer_diff", "mean_diff"):  # the per-layer c_l behind ĉ
        per_layer = per_layer_directions(request.residuals(), layers, dset.method)
    return Fitted(direction, base, cal_idx, eval_idx, per_layer, steer)
