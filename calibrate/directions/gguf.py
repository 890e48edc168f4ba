"""repeng control vectors in GGUF: read one as ``direction.path``, write a direction as one.

repeng's ``ControlVector.export_gguf`` writes a GGUF with ``general.architecture =
controlvector``, the string ``controlvector.model_hint`` (the model's ``model_type``), the
uint32 ``controlvector.layer_count`` and one float tensor ``direction.<i>`` per layer, where i
indexes repeng's list of blocks from 0 and the vector is added to **block i's output**. In this
harness's numbering (layer ℓ = output of block ℓ, 1-based) repeng's layer i is **layer i + 1**.
repeng's vectors are PCA components (unit norm), signed so that the positive examples project
higher; a vector is added with a user-chosen coefficient at every position.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibrate.errors import UserError

ARCH = "controlvector"


class ControlVectorError(UserError):
    """A GGUF file is not a readable repeng control vector."""


@dataclass
class ControlVector:
    """repeng's ``ControlVector``: the model hint and one vector per layer (our numbering)."""

    model_hint: str
    directions: dict[int, np.ndarray]  # our layer (repeng index + 1) -> [hidden] float64


def _string(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not len(field.parts):
        return None
    return bytes(field.parts[-1]).decode("utf-8", errors="replace")


def read_control_vector(path: str | Path) -> ControlVector:
    """Read a repeng control-vector GGUF (``direction.<i>`` tensors, repeng index i -> layer i+1)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ControlVectorError(f"{str(path)!r} is not a readable GGUF file: {err}") from err
    arch = _string(reader, "general.architecture")
    if arch != ARCH:
        raise ControlVectorError(f"{str(path)!r}: general.architecture is {arch!r}, not {ARCH!r} "
                                 "(not a repeng control vector)")
    hint = _string(reader, f"{ARCH}.model_hint")
    if hint is None:
        raise ControlVectorError(f"{str(path)!r}: no {ARCH}.model_hint field")
    directions: dict[int, np.ndarray] = {}
    for tensor in reader.tensors:
        if not tensor.name.startswith("direction."):
            continue
        try:
            index = int(tensor.name.split(".", 1)[1])
        except ValueError as err:
            raise ControlVectorError(f"{str(path)!r}: bad tensor name {tensor.name!r}") from err
        directions[index + 1] = np.asarray(tensor.data, dtype=np.float64).reshape(-1)
    if not directions:
        raise ControlVectorError(f"{str(path)!r}: no direction.<layer> tensors")
    return ControlVector(hint, dict(sorted(directions.items())))


def write_control_vector(path: str | Path, model_hint: str,
                         directions: Mapping[int, np.ndarray]) -> Path:
    """Write ``directions`` {our layer ℓ >= 1: vector} as repeng's ``export_gguf`` does
    (tensor ``direction.<ℓ - 1>``, float32)."""
    import gguf

    bad = [layer for layer in directions if int(layer) < 1]
    if bad:
        raise ControlVectorError(f"layers {bad}: a control vector edits block outputs (layer >= 1)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_string(f"{ARCH}.model_hint", model_hint)
    writer.add_uint32(f"{ARCH}.layer_count", len(directions))
    for layer, vector in sorted(directions.items()):
        writer.add_tensor(f"direction.{int(layer) - 1}", np.asarray(vector, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
