"""ĉ for a job: fit with ``direction.method`` on a calibration split, or loaded from a file.

The split is the job's own seeded calibration split (``direction.calibration_fraction``), of the
job's dataset, of another dataset (``direction.source``, its own calibration split), or of the
job's records in another prompt style (``direction.source_prompt``). ``direction.path`` loads a
saved direction (a job's ``direction.safetensors``, or a repeng control-vector GGUF) instead.

Every direction's meta also records its cosine with layer_diff's ĉ fit on the same rows
(``cosine_layer_diff``) and its null-space alignment ρ = ‖U_kᵀ ĉ‖ (``null_space_rho``, k from the
``nullspace`` group): what the methods are compared by, beside their steering results.

Nothing here names a method: each is a strategy of :mod:`calibrate.directions` that says which
residual layers it reads and fits itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from calibrate.core.direction import (
    Direction,
    DirectionError,
    check_layers,
    fit_direction,
    residual_layers_for,
)
from calibrate.directions.direction_method import FitRequest, get_method
from calibrate.directions.files import check_compatible, checked_vector, load_direction
from calibrate.engine.probe import ProbeResult
from calibrate.engine.readout import Readout
from calibrate.model.load import LoadedModel
from calibrate.tasks.prompts import PromptSet, build_prompts
from calibrate.tasks.shots import PromptStyle


class FitContext(Protocol):
    """What the fit uses of a job (:class:`calibrate.studies.job_context.JobContext` is one).

    ``spec`` is the job's typed spec; the fit reads its ``direction``, ``dataset``, ``prompt``,
    ``phases``, ``nullspace``, ``probe``, ``cache_dir`` and ``direction_source`` (the resolved
    config of ``direction.source``, or None).
    """

    spec: Any
    loaded: LoadedModel
    prompt_set: PromptSet
    readout: Readout

    @property
    def num_layers(self) -> int: ...

    def probe(self, prompt_set: PromptSet | None = None, keep: Any = ()) -> ProbeResult: ...

    def split(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]: ...

    def measure(self, result: ProbeResult) -> pd.DataFrame: ...


@dataclass
class Fitted:
    """ĉ fit on the calibration split, and the unsteered probe of the job's prompts."""

    direction: Direction
    base: ProbeResult  # all of the job's examples, with the residuals of the fit/steer layers
    cal_idx: np.ndarray
    eval_idx: np.ndarray
    per_layer: dict[int, np.ndarray]  # the per-layer c_l means (empty when loaded or random)
    steer_layers: list[int]


def _direction_layers(ctx: FitContext, fit_set: PromptSet, fit_cal: np.ndarray) -> list[int]:
    layers = ctx.spec.direction.layers
    if layers == "auto":  # the correction phase detected on the calibration rows
        from calibrate.core.phases import find_phases

        phases = find_phases(ctx.measure(ctx.probe(fit_set).take(fit_cal)), ctx.spec.phases)
        if not phases.correction_layers:
            raise DirectionError(f"direction.layers=auto: {phases.note}; set direction.layers")
        layers = phases.correction_layers
    return check_layers(layers, ctx.num_layers)


def fit_style(own: PromptStyle, settings: Any) -> PromptStyle:
    """The prompt style ĉ is fit in: ``direction.source_prompt``'s keys over the job's ``own``."""
    source = settings.source_prompt
    if source is None:
        return own
    given = {"shots": own.shots, "chat_template": own.chat_template, "seed": own.seed,
             **source.given()}
    return PromptStyle(**given)


def _fit_source(ctx: FitContext) -> tuple[PromptSet, np.ndarray, Any, PromptStyle]:
    """The prompts, calibration rows, dataset config and prompt style ĉ is fit on.

    Another dataset (``direction.source``) is fit on its own calibration split. The job's
    dataset in another prompt style (``direction.source_prompt``) is fit on the job's own
    calibration records, which must then be the same records in both styles.
    """
    from calibrate.tasks.data import DatasetError
    from calibrate.tasks.shots import load_with_exemplars

    spec, dset = ctx.spec, ctx.spec.direction
    own = spec.prompt
    style = fit_style(own, dset)
    if not dset.source and style == own:
        return ctx.prompt_set, ctx.split()[0], spec.dataset, own
    source = spec.direction_source if dset.source else spec.dataset
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
            f"direction.source_prompt={dset.source_prompt.given()}: the job ({own.shots} shots) "
            f"and the fit ({style.shots} shots) would not see the same {spec.dataset.name} "
            "records (exemplars were taken out of the evaluated rows), so the fit could read "
            "evaluation rows; set dataset.limit below the split's size so exemplars come from "
            "rows neither evaluates")
    return fit_set, ctx.split()[0], spec.dataset, style


def gguf_direction(path: str, steer: list[int], model_type: str, hidden: int,
                   allow_cross_model: bool) -> Direction:
    """A repeng control-vector GGUF as a unit direction (:mod:`calibrate.directions.gguf`): its
    only vector, or the one at the last steering layer (repeng's block i is our layer i + 1).
    repeng signs a vector towards its positive examples; it is used as given (+η adds it)."""
    from calibrate.directions.gguf import ControlVectorError, read_control_vector

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
    unit, norm = checked_vector(control.directions[layer], hidden,
                                f"direction.path={path!r} (layer {layer})")
    meta = {"method": "repeng_gguf", "source_file": str(path), "model_hint": control.model_hint,
            "gguf_layers": layers, "layers": [int(layer)], "raw_norm": norm,
            "loaded_norm": norm, "hidden": hidden}
    if control.model_hint != model_type:
        meta["cross_model_transfer"] = True
    return Direction(unit, meta)


def _loaded_direction(ctx: FitContext, steer: list[int]) -> Direction:
    dset, loaded = ctx.spec.direction, ctx.loaded
    hidden = loaded.adapter.unembed_weight.shape[1]
    if str(dset.path).endswith(".gguf"):
        return gguf_direction(dset.path, steer, loaded.adapter.model_type, hidden,
                              dset.allow_cross_model)
    return check_compatible(load_direction(dset.path, hidden), loaded.unembed_hash, loaded.name,
                            dset.allow_cross_model)


def comparison_meta(ctx: FitContext, direction: Direction,
                    residuals: dict[int, np.ndarray], layers: list[int]) -> dict[str, Any]:
    """The direction's cosine with layer_diff's ĉ on the same rows and its null-space ρ."""
    import torch

    from calibrate.core import nullspace
    from calibrate.io.nullspace_cache import cached_null_space
    from calibrate.model.assets import cache_root

    out: dict[str, Any] = {}
    try:
        reference = fit_direction(residuals, layers, "layer_diff").vector
        out["cosine_layer_diff"] = float(direction.vector @ reference
                                         / max(np.linalg.norm(direction.vector), 1e-300))
    except DirectionError:  # the differences cancel out: no reference
        out["cosine_layer_diff"] = None
    weight = ctx.loaded.adapter.unembed_weight.detach().cpu()
    k = ctx.spec.nullspace.k_for(weight.shape[1])
    basis, _ = cached_null_space(weight, k, cache_root(ctx.spec.cache_dir),
                                 digest=ctx.loaded.unembed_hash)  # that weight's sha256
    out["null_space_rho"] = nullspace.alignment(torch.as_tensor(direction.vector), basis)
    out["null_space_k"] = int(k)
    return out


def obtain_direction(ctx: FitContext, steer: list[int]) -> Fitted:
    """Fit ĉ with ``direction.method`` on the calibration split, or load ``direction.path``;
    ``steer``: the layers the job edits (resolved)."""
    dset = ctx.spec.direction
    cal_idx, eval_idx = ctx.split()
    if dset.path:
        return Fitted(_loaded_direction(ctx, steer), ctx.probe(keep=steer), cal_idx, eval_idx,
                      {}, steer)
    fit_set, fit_cal, fit_cfg, style = _fit_source(ctx)
    layers = _direction_layers(ctx, fit_set, fit_cal)
    method, settings = get_method(dset.method), dset.method_settings()
    last = ctx.num_layers - 1
    keep = sorted(set(residual_layers_for(layers)) | set(steer)
                  | set(method.extra_layers(settings, steer, last)))
    # One probe pass serves the metrics and the fit when both use the job's prompts.
    base = ctx.probe(keep=keep if fit_set is ctx.prompt_set else steer)
    request = FitRequest(ctx.loaded, fit_set, fit_cal, layers, steer, dset.seed, settings, keep,
                         lambda prompt_set, kept: ctx.probe(prompt_set, kept), ctx.readout,
                         ctx.spec.probe.prefix_reuse)
    direction = method.fit(request)
    direction.meta.update(model=ctx.loaded.name, unembed_hash=ctx.loaded.unembed_hash,
                          split="calibration", n_examples=int(len(fit_cal)),
                          dataset=fit_cfg.name, dataset_split=fit_cfg.split,
                          fit_prompt=style.summary(), prompt_transfer=style != ctx.spec.prompt)
    direction.meta.update(comparison_meta(ctx, direction, request.residuals(), layers))
    return Fitted(direction, base, cal_idx, eval_idx, method.per_layer(request), steer)
