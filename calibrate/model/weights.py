"""The weight files checked before they are read: a truncated or corrupt safetensors file, or a
shard its index names that is missing, is one error line naming the file (headers only)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from calibrate.model.config import ModelConfig, ModelConfigError, one_line
from calibrate.model.source import cached_config, local_dir

_MAX_HEADER = 100_000_000  # safetensors' own limit


def _check_safetensors(path: Path) -> None:
    """One error line if ``path`` is not a complete safetensors file (header and data sizes)."""
    size = path.stat().st_size
    accepted = "accepted: a complete safetensors file (re-download or re-save the model)"
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise ModelConfigError(f"weights file {str(path)!r} is truncated ({size} bytes); {accepted}")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER:
            raise ModelConfigError(f"weights file {str(path)!r} is corrupt (header length {header_len} "
                                   f"bytes, not safetensors); {accepted}")
        if 8 + header_len > size:
            raise ModelConfigError(f"weights file {str(path)!r} is truncated or corrupt ({size} bytes, "
                                   f"its header alone needs {8 + header_len}); {accepted}")
        try:
            header = json.loads(fh.read(header_len))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise ModelConfigError(f"weights file {str(path)!r} is corrupt (unreadable safetensors "
                                   f"header: {one_line(err)[:80]}); {accepted}") from err
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise ModelConfigError(f"weights file {str(path)!r} is truncated ({size} of {expected} bytes); "
                               f"{accepted}")
    if size > expected:
        raise ModelConfigError(f"weights file {str(path)!r} is corrupt ({size} bytes, its header "
                               f"describes {expected}); {accepted}")


def _weights_folder(source: str, config: ModelConfig) -> tuple[Path | None, bool]:
    """The folder holding the weights files now (local, or the cached hub snapshot), and whether
    every file must be there already (a local folder)."""
    local = local_dir(source)
    if local is not None:
        return local, True
    try:
        cached = cached_config(source, config.revision)
    except ValueError:
        return None, False
    return (Path(cached).parent, False) if cached else (None, False)


def check_weights(source: str, cfg: ModelConfig) -> None:
    """One error line naming the file if a safetensors file of ``source`` is truncated, corrupt or
    (local folders) missing from its index; reads only the headers."""
    folder, complete = _weights_folder(source, cfg)
    if folder is None:
        return
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelConfigError(f"weights index {str(index)!r} is corrupt ({one_line(err)[:80]}); "
                                   "accepted: a safetensors index with a weight_map") from err
    else:
        names = ["model.safetensors"]
    for name in names:
        path = folder / name
        if path.is_file():
            _check_safetensors(path)
        elif complete and index.is_file():
            raise ModelConfigError(f"weights file {str(path)!r} named in {index.name} is missing; "
                                   "accepted: a folder with every shard its index names")
