"""Job outputs, written atomically: a job that dies leaves no file that looks complete.

Every file is written to a temporary name in the same folder and renamed into place.
``metrics.json`` is written last and is the job's completion marker: a job directory without
it (or whose ``metrics.json`` has ``status`` other than ``complete``) is not a finished result.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

METRICS_FILE = "metrics.json"
LAYERS_FILE = "layers.csv"
PREDICTIONS_FILE = "predictions.npz"
ERROR_FILE = "error.json"


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write ``path`` through ``write(handle)`` on a temporary file, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """Atomically write a UTF-8 text file."""
    return atomic_write(path, lambda h: h.write(text.encode("utf-8")))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    """Atomically write JSON (numpy scalars and arrays converted)."""
    return write_text(path, json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")


def write_csv(path: Path, table: pd.DataFrame) -> Path:
    """Atomically write a DataFrame as CSV without its index, full float precision."""
    return write_text(path, table.to_csv(index=False, float_format="%.17g"))


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    """Atomically write compressed numpy arrays."""
    return atomic_write(path, lambda h: np.savez_compressed(h, **arrays))


def merge_json(path: Path, values: Mapping[str, Any]) -> Path:
    """Merge ``values`` into the JSON object at ``path`` (created if missing), atomically."""
    path = Path(path)
    existing = json.loads(path.read_text()) if path.exists() else {}
    if not isinstance(existing, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return write_json(path, {**existing, **values})


def read_metrics(job_dir: Path) -> dict[str, Any] | None:
    """The job's metrics.json, or None when the job did not complete."""
    path = Path(job_dir) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return data if isinstance(data, dict) and data.get("status") == "complete" else None


def remove_outputs(job_dir: Path, names: list[str]) -> None:
    """Delete named result files (used when a job fails, so nothing half-made remains)."""
    for name in names:
        (Path(job_dir) / name).unlink(missing_ok=True)
