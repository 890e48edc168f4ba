"""A steering job's ĉ as the steering file of lm-evaluation-harness's ``steered`` model.

lm-eval's ``--model steered --model_args pretrained=<model>,steer_path=<file>.pt`` loads a
torch file ``{hookpoint: {"steering_vector", "steering_coefficient", "action", "bias",
"head_index"}}`` and, with ``action: add``, adds ``steering_coefficient * steering_vector`` to the
output of the module named ``hookpoint`` in ``model.base_model.named_modules()`` at **every
position** (lm_eval/models/hf_steered.py). Our layer ℓ >= 1 is the output of block ℓ (1-based),
i.e. the hookpoint of block index ℓ - 1 (``layers.{ℓ-1}`` for Llama-like models, ``h.{ℓ-1}`` for
GPT-2, ``decoder.layers.{ℓ-1}`` for OPT). Layer 0 (the embedding output) has no single module
whose output it is for every architecture and is refused.

The coefficient is in absolute units: η with ``eta_scale: absolute``, η × the layer's mean
residual norm (``direction.json``'s ``layer_scale``) with ``eta_scale: residual_norm``. The
exported edit equals a ``position: all`` steering job's; a ``position: last`` job edits only
the last prompt position, which lm-eval cannot express, so it is refused unless forced.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from calibrate.core.direction import Direction, DirectionError
from calibrate.directions.files import read_direction as load_direction
from calibrate.errors import UserError

# base_model-relative name of block index i (lm-eval hooks model.base_model.named_modules())
HOOKPOINTS: dict[str, str] = {
    **{t: "layers.{i}" for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                 "gemma3_text", "phi", "gpt_neox")},
    "gpt2": "h.{i}",
    "opt": "decoder.layers.{i}",
}


class ExportError(UserError):
    """A job cannot be exported as asked."""


def hookpoint(model_type: str, layer: int) -> str:
    """lm-eval's hookpoint for our residual layer ``layer`` (the output of block ``layer``)."""
    if model_type not in HOOKPOINTS:
        raise ExportError(f"no lm-eval hookpoint for model type {model_type!r}; known: "
                          f"{', '.join(sorted(HOOKPOINTS))}")
    if layer < 1:
        raise ExportError(f"layer {layer}: lm-eval's steered model hooks block outputs; layer 0 "
                          "(the embedding output) cannot be exported")
    return HOOKPOINTS[model_type].format(i=layer - 1)


def steering_config(direction: Direction, model_type: str, layers: list[int], eta: float,
                    layer_scale: Mapping[Any, float] | None = None) -> dict[str, dict[str, Any]]:
    """The dict lm-eval's steered model loads: one ``add`` entry per layer."""
    import torch

    vector = torch.as_tensor(np.asarray(direction.vector, dtype=np.float32))
    out = {}
    for layer in layers:
        scale = 1.0 if not layer_scale else float(
            layer_scale.get(layer, layer_scale.get(str(layer))))
        out[hookpoint(model_type, int(layer))] = {
            "steering_vector": vector.clone(), "steering_coefficient": float(eta) * scale,
            "action": "add", "bias": None, "head_index": None}
    return out


def export_job(job_dir: str | Path, eta: float, out: str | Path | None = None,
               force: bool = False) -> Path:
    """Write ``<job dir>/lmeval_steer_eta<η>.pt`` (or ``out``) from a steering job's
    ``direction.safetensors``, ``direction.json`` and ``metrics.json``."""
    import torch

    job_dir = Path(job_dir)
    missing = [n for n in ("direction.safetensors", "direction.json", "metrics.json")
               if not (job_dir / n).is_file()]
    if missing:
        raise ExportError(f"{str(job_dir)!r} is not a complete steering job: no {', '.join(missing)}")
    metrics = json.loads((job_dir / "metrics.json").read_text())
    meta = json.loads((job_dir / "direction.json").read_text())
    model_type = metrics.get("model_type") or (metrics.get("model_identity") or {}).get("model_type")
    layers = meta.get("intervention_layers") or metrics.get("intervention_layers")
    if not model_type or not layers:
        raise ExportError(f"{str(job_dir)!r}: metrics.json/direction.json name no model type or "
                          "intervention layers (not a steering job)")
    position = meta.get("position", metrics.get("position"))
    if position != "all" and not force:
        raise ExportError(f"the job steered intervention.position={position!r}; lm-eval's steered "
                          "model adds at every position (position=all). Rerun with "
                          "intervention.position=all, or pass --force to export anyway")
    try:
        direction = load_direction(job_dir / "direction.safetensors")
    except DirectionError as err:
        raise ExportError(str(err)) from err
    scale = meta.get("layer_scale") if meta.get("eta_scale") == "residual_norm" else None
    config = steering_config(direction, model_type, [int(x) for x in layers], eta, scale)
    path = Path(out) if out else job_dir / f"lmeval_steer_eta{eta:g}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(config, path)
    return path
