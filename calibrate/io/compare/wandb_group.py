"""Rows of an online W&B group, added to the runs table (``--wandb-group``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from calibrate.io.compare.runs import CompareError


def wandb_rows(group_path: str) -> list[dict[str, Any]]:
    """Summary rows of the runs of an online W&B group ``ENTITY/PROJECT/GROUP``."""
    parts = group_path.split("/")
    if len(parts) != 3 or not all(parts):
        raise CompareError(f"--wandb-group={group_path!r}; accepted: ENTITY/PROJECT/GROUP")
    entity, project, group = parts
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        raise CompareError(f"--wandb-group={group_path}: W&B is {mode} (WANDB_MODE={mode}); an "
                           "online group needs network access and a W&B login. Everything else "
                           "works offline: drop --wandb-group")
    try:
        import wandb

        api = wandb.Api(timeout=20)
        runs = list(api.runs(f"{entity}/{project}", filters={"group": group}))
    except Exception as err:  # noqa: BLE001 - no network, no login, no such project: one message
        raise CompareError(f"--wandb-group={group_path}: cannot fetch the group from W&B "
                           f"({type(err).__name__}: {err}); are you online and logged in "
                           "(`wandb login`)? Everything else works offline: drop --wandb-group") \
            from None
    if not runs:
        raise CompareError(f"--wandb-group={group_path}: the group has no runs")
    rows = []
    for wrun in runs:
        summary = dict(getattr(wrun, "summary", {}) or {})
        config = dict(getattr(wrun, "config", {}) or {})

        def name_of(key: str) -> Any:
            value = config.get(key)
            return value.get("name") if isinstance(value, Mapping) else value

        row: dict[str, Any] = {
            "sweep": f"wandb:{group_path}", "job": getattr(wrun, "name", ""),
            "label": getattr(wrun, "name", ""), "overrides": "",
            "status": "complete" if getattr(wrun, "state", "") == "finished"
            else str(getattr(wrun, "state", "unknown")),
            "model": name_of("model"), "dataset": name_of("dataset"),
            "n_examples": summary.get("n_examples"),
        }
        row.update({k[len("final/"):]: v for k, v in summary.items()
                    if k.startswith("final/") and isinstance(v, (int, float))})
        for key in ("plateau_layer", "peak_ece_layer", "peak_ece"):
            row[key] = summary.get(key)
        row["path"] = getattr(wrun, "url", "")
        rows.append(row)
    return rows
