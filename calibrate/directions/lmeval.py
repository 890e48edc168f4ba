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

Only one finished result is exported (:func:`read_steering_job`): a complete metrics.json, and
direction files that carry its ``config_hash``. η must be finite and one the job ran (its
metrics.json ``etas``) unless forced; what was forced is warned about (:class:`ForcedExport`)
and recorded in every entry of the file (``calibrate``: job, config_hash, η, forced).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibrate.core.direction import Direction, DirectionError
from calibrate.directions.files import read_direction
from calibrate.errors import UserError
from calibrate.io import results

# base_model-relative name of block index i (lm-eval hooks model.base_model.named_modules())
HOOKPOINTS: dict[str, str] = {
    **{t: "layers.{i}" for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                 "gemma3_text", "phi", "gpt_neox")},
    "gpt2": "h.{i}",
    "opt": "decoder.layers.{i}",
}


class ExportError(UserError):
    """A job cannot be exported as asked."""


class ForcedExport(UserWarning):
    """An export went past a check because ``force`` was given (the message says which)."""


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


def read_steering_job(job_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any], Direction]:
    """metrics.json, direction.json and the direction of one finished steering job.

    Raises:
        ExportError: metrics.json is missing or not complete, the job did not steer, or a
            direction file does not carry the ``config_hash`` of metrics.json (files of another
            result, or written before directions carried it).
    """
    job_dir = Path(job_dir)
    metrics = results.read_metrics(job_dir)
    if metrics is None:
        raise ExportError(f"{str(job_dir)!r} holds no finished result (metrics.json missing or "
                          "not complete); accepted: the folder of a finished steering job")
    missing = [n for n in ("direction.safetensors", "direction.json")
               if not (job_dir / n).is_file()]
    if missing or not metrics.get("etas") or not metrics.get("intervention_layers"):
        lacking = f", no {', '.join(missing)}" if missing else ""
        raise ExportError(f"{str(job_dir)!r} is not a steering job (study "
                          f"{metrics.get('study')!r}{lacking}); accepted: the folder of a "
                          "finished steering job")
    try:
        meta = json.loads((job_dir / "direction.json").read_text())
        direction = read_direction(job_dir / "direction.safetensors")
    except (ValueError, OSError, DirectionError) as err:
        raise ExportError(f"{str(job_dir)!r}: unreadable direction files ({err})") from err
    identity = metrics.get("config_hash")
    for name, found in (("direction.json", meta.get("config_hash")),
                        ("direction.safetensors", direction.meta.get("config_hash"))):
        if not identity or found != identity:
            raise ExportError(f"{str(job_dir)!r}: {name} does not belong to its metrics.json "
                              f"(config_hash {found!r}, metrics.json {identity!r}); rerun the "
                              "steering job into a fresh folder and export that")
    return metrics, meta, direction


def check_eta(eta: float, etas: Sequence[float], force: bool = False) -> str | None:
    """None when ``eta`` is one of the job's ``etas``; with ``force``, the note of an η it did
    not run. Raises ExportError for a non-finite η (always) and an η the job did not run."""
    ran = ", ".join(f"{float(e):g}" for e in etas)
    if not math.isfinite(eta):
        raise ExportError(f"--eta {eta}: not a finite number; accepted: one of the job's η "
                          f"({ran})")
    if any(math.isclose(eta, float(e), rel_tol=1e-9, abs_tol=0.0) for e in etas):
        return None
    if not force:
        raise ExportError(f"--eta {eta:g}: the job did not run η = {eta:g}; accepted: one of its "
                          f"η ({ran}), or --force to export an η it never measured")
    return f"η = {eta:g} is not one of the job's η ({ran})"


def _forced(notes: Sequence[str]) -> None:
    if notes:
        warnings.warn(f"forced export: {'; '.join(notes)}", ForcedExport, stacklevel=3)


def export_job(job_dir: str | Path, eta: float, out: str | Path | None = None,
               force: bool = False) -> Path:
    """Write ``<job dir>/lmeval_steer_eta<η>.pt`` (or ``out``) from a steering job's
    ``direction.safetensors``, ``direction.json`` and ``metrics.json``
    (checked by :func:`read_steering_job` and :func:`check_eta`)."""
    import torch

    job_dir = Path(job_dir)
    metrics, meta, direction = read_steering_job(job_dir)
    forced = [note for note in [check_eta(float(eta), metrics["etas"], force)] if note]
    model_type = metrics.get("model_type") or (metrics.get("model_identity") or {}).get("model_type")
    layers = meta.get("intervention_layers") or metrics.get("intervention_layers")
    if not model_type:
        raise ExportError(f"{str(job_dir)!r}: metrics.json names no model type")
    position = meta.get("position", metrics.get("position"))
    if position != "all":
        if not force:
            raise ExportError(f"the job steered intervention.position={position!r}; lm-eval's "
                              "steered model adds at every position (position=all). Rerun with "
                              "intervention.position=all, or pass --force to export anyway")
        forced.append(f"the job steered position={position!r}, lm-eval adds at every position")
    scale = meta.get("layer_scale") if meta.get("eta_scale") == "residual_norm" else None
    config = steering_config(direction, model_type, [int(x) for x in layers], eta, scale)
    record = {"job_dir": str(job_dir), "config_hash": metrics["config_hash"], "eta": float(eta),
              "forced": forced}
    for entry in config.values():
        entry["calibrate"] = {**record, "forced": list(forced)}  # lm-eval reads only its keys
    _forced(forced)
    path = Path(out) if out else job_dir / f"lmeval_steer_eta{eta:g}.pt"
    return results.atomic_write(path, lambda handle: torch.save(config, handle))


# calibrate's dataset config -> lm-eval's task of the same data (None: lm-eval has none offline)
LMEVAL_TASKS = {"mmlu": "mmlu", "arc_easy": "arc_easy", "arc_challenge": "arc_challenge",
                "sst2": "sst2", "boolq": "boolq", "copa": "copa", "hellaswag": "hellaswag",
                "openbookqa": "openbookqa", "piqa": "piqa", "sciq": "sciq",
                "truthfulqa": "truthfulqa_mc1"}


def lmeval_command(job_dir: str | Path, steer_file: str | Path) -> str:
    """The ``lm_eval`` command that evaluates the job's model steered by ``steer_file``: the
    model's local folder (or hub id) as the job loaded it, the task of the job's dataset."""
    import shlex

    metrics = json.loads((Path(job_dir) / "metrics.json").read_text())
    source = metrics.get("model_source") or metrics.get("model")
    task = LMEVAL_TASKS.get(metrics.get("dataset"), "<task>")
    return (f"lm_eval --model steered --model_args "
            f"{shlex.quote(f'pretrained={source},steer_path={Path(steer_file).absolute()}')} "
            f"--tasks {task} --device cpu --batch_size 8")
