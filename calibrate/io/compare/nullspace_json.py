"""The null-space controls of the runs: the comparable figures of each job's nullspace.json."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from calibrate.io.compare.runs import NULLSPACE_FILE, Run, _warn
from calibrate.io.compare.tables import _run_info


def _number(value: Any) -> tuple[float, float | None] | None:
    """A number, or the mean and standard deviation of a list of numbers (None otherwise)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value), None
    if isinstance(value, Sequence) and not isinstance(value, str) and value:
        numbers = [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) == len(value):
            arr = np.asarray(numbers, float)
            return float(arr.mean()), float(arr.std()) if len(arr) > 1 else None
    if isinstance(value, Mapping):
        for key in ("mean", "value"):
            if key in value:
                found = _number(value[key])
                if found is not None:
                    std = value.get("std")
                    return found[0], float(std) if isinstance(std, (int, float)) else found[1]
    return None


def _lookup(data: Mapping[str, Any],
            places: Sequence[tuple[str, ...]]) -> tuple[float, float | None] | None:
    for place in places:
        node: Any = data
        for key in place:
            node = node.get(key) if isinstance(node, Mapping) else None
        found = _number(node) if node is not None else None
        if found is not None:
            return found
    return None


def _list_of(data: Any, key: str, field_name: str) -> Any:
    node = data.get(key) if isinstance(data, Mapping) else None
    if isinstance(node, Sequence) and node and all(isinstance(x, Mapping) for x in node):
        return [x.get(field_name) for x in node]
    return None


def nullspace_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """The comparable figures of one nullspace.json, found wherever they sit.

    Scalars at the top level are kept as they are; the truncation deltas are looked up as
    ``delta_<m>`` at the top level or under ``truncation``, the random-subspace control as
    ``random_delta_<m>`` at the top level or under ``truncation``/``random_control``, or
    ``delta_<m>`` under ``random_control`` (a number, a list of numbers, a list of objects, or
    ``{mean, std}``; lists give ``random_delta_<m>_std``).
    """
    out: dict[str, Any] = {k: v for k, v in data.items()
                           if isinstance(v, (int, float, str, bool)) or v is None}
    for metric in ("ece", "mce", "accuracy"):
        own = _lookup(data, [(f"delta_{metric}",), (f"truncation_delta_{metric}",),
                             ("truncation", f"delta_{metric}")])
        rand = _lookup(data, [(f"random_delta_{metric}",), ("truncation", f"random_delta_{metric}"),
                              ("random_control", f"delta_{metric}"),
                              ("random_control", f"random_delta_{metric}")])
        if rand is None:
            listed = _list_of(data, "random_control", f"delta_{metric}")
            rand = _number(listed) if listed is not None else None
        if own is not None:
            out[f"delta_{metric}"] = own[0]
        if rand is not None:
            out[f"random_delta_{metric}"] = rand[0]
            if rand[1] is not None:
                out[f"random_delta_{metric}_std"] = rand[1]
    return out


def nullspace_rows(run: Run) -> list[dict[str, Any]]:
    """Rows of the run's nullspace.json (an object, or a list of objects, e.g. one per k)."""
    path = run.job_dir / NULLSPACE_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        _warn(f"{path}: cannot read ({err}); left out of nullspace.csv")
        return []
    items = data if isinstance(data, list) else [data]
    info = {k: v for k, v in _run_info(run).items() if not k.startswith("direction_")}
    return [{**info, **nullspace_fields(item)} for item in items if isinstance(item, Mapping)]
