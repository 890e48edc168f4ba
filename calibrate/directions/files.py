"""Direction files: ``direction.safetensors`` + ``direction.json``, read and written, and checked.

Every vector that comes from outside a fit (a file, a repeng GGUF, a caller's array) passes
:func:`checked_vector`: it must be one-dimensional, finite, non-zero and of the model's width; it
is scaled to unit norm and its original norm is recorded (``loaded_norm``), so "η = 1" means
one unit along the direction whatever the file held.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from calibrate.core.direction import Direction, DirectionError
from calibrate.io import results

VECTOR_KEY = "direction"


def checked_vector(vector: Any, hidden: int, what: str) -> tuple[np.ndarray, float]:
    """(unit vector, original norm) of a direction given from outside; ``what`` names it."""
    array = np.asarray(vector, dtype=np.float64)
    if array.ndim != 1:
        raise DirectionError(f"{what} has shape {list(array.shape)}; accepted: a vector of the "
                             f"model's width [{hidden}]")
    if array.shape[0] != hidden:
        raise DirectionError(f"{what} has width {array.shape[0]} but the model's residual width "
                             f"is {hidden}; accepted: a vector of width {hidden}")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise DirectionError(f"{what} has {bad} non-finite entries (NaN or inf); accepted: a "
                             "finite vector")
    norm = float(np.linalg.norm(array))
    if not np.isfinite(norm) or norm == 0.0:
        raise DirectionError(f"{what} is the zero vector (norm {norm}); accepted: a non-zero "
                             "vector (it is scaled to unit norm)")
    return array / norm, norm


def save_direction(direction: Direction, folder: Path, stem: str = "direction") -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` (the vector) and ``<stem>.json`` (its metadata), atomically."""
    folder = Path(folder)
    tensors = results.atomic_write(folder / f"{stem}.safetensors",
                                   lambda h: h.write(_safetensors_bytes(direction)))
    meta = results.write_json(folder / f"{stem}.json", direction.meta)
    return tensors, meta


def _safetensors_bytes(direction: Direction) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.safetensors"
        save_file({VECTOR_KEY: np.ascontiguousarray(direction.vector, dtype=np.float64)}, str(path),
                  metadata={"meta": json.dumps(direction.meta, default=str)})
        return path.read_bytes()


def read_direction(path: str | Path) -> Direction:
    """A direction file as written by :func:`save_direction` (the .safetensors or .json path),
    unchecked; :func:`load_direction` checks it against a model."""
    path = Path(path)
    tensors = path.with_suffix(".safetensors")
    if not tensors.is_file():
        raise DirectionError(f"direction.path={str(path)!r}: no file {tensors.name}; give the "
                             ".safetensors file a previous job wrote")
    try:
        stored = load_file(str(tensors))
        from safetensors import safe_open

        with safe_open(str(tensors), "np") as handle:
            meta = json.loads((handle.metadata() or {}).get("meta", "{}"))
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise DirectionError(f"direction.path={str(path)!r} is not a readable direction file: "
                             f"{err}") from None
    if VECTOR_KEY not in stored:
        raise DirectionError(f"direction.path={str(path)!r} holds {sorted(stored)}, no "
                             f"{VECTOR_KEY!r} tensor; give a direction.safetensors a job wrote")
    if not isinstance(meta, dict):
        raise DirectionError(f"direction.path={str(path)!r}: its metadata is not a mapping")
    return Direction(np.asarray(stored[VECTOR_KEY], dtype=np.float64), meta)


def load_direction(path: str | Path, hidden: int) -> Direction:
    """:func:`read_direction`, checked (:func:`checked_vector`) for a model of width ``hidden``."""
    direction = read_direction(path)
    unit, norm = checked_vector(direction.vector, hidden, f"direction.path={str(path)!r}")
    return Direction(unit, {**direction.meta, "loaded_norm": norm, "source_file": str(path)})


def check_compatible(direction: Direction, unembed_hash: str, model_name: str,
                     allow_cross_model: bool) -> Direction:
    """Refuse a direction fit on another model (another unembedding) unless allowed; then flag it."""
    source_hash = direction.meta.get("unembed_hash")
    if source_hash and source_hash != unembed_hash:
        if not allow_cross_model:
            raise DirectionError(
                f"the direction was fit on model {direction.meta.get('model')!r} (unembedding hash "
                f"{source_hash[:12]}), not on {model_name!r} ({unembed_hash[:12]}); set "
                "direction.allow_cross_model=true to apply it anyway (a cross-model transfer)")
        direction.meta = {**direction.meta, "cross_model_transfer": True, "applied_to": model_name}
    return direction
