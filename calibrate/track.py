"""Experiment tracking: Weights & Biases or nothing.

A tracker failure never fails a job or loses local results: an unreachable W&B falls back to
offline mode with a warning, and any logging error is reported and ignored. The run is always
finished (the job calls :meth:`Tracker.finish` in ``finally``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

LAYER_PREFIX = "layer/"


class Tracker:
    """Logs nothing; the base of the real trackers (``tracker=none``)."""

    def log_layers(self, table: pd.DataFrame, prefix: str = LAYER_PREFIX) -> None:
        """Log each per-layer column as a series over ``layer``, plus the table itself."""

    def log_table(self, key: str, table: pd.DataFrame) -> None:
        """Log a table."""

    def log_images(self, paths: Mapping[str, Path]) -> None:
        """Log PNG files under their keys."""

    def log_summary(self, values: Mapping[str, Any]) -> None:
        """Set summary values (the same names in every run)."""

    def log_artifact(self, name: str, kind: str, paths: list[Path], metadata: Mapping[str, Any]) -> None:
        """Store files as a versioned artifact."""

    def finish(self, exit_code: int = 0) -> None:
        """Close the run."""


class WandbTracker(Tracker):
    """A W&B run; every call is guarded so tracking never breaks a job."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self._layer_metrics_defined: set[str] = set()

    def _guard(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - tracking must never fail the job
            warnings.warn(f"W&B {what} failed ({err}); local results are unaffected", stacklevel=3)

    def _define(self, prefix: str) -> None:
        if prefix not in self._layer_metrics_defined:
            self.run.define_metric("layer")
            self.run.define_metric(f"{prefix}*", step_metric="layer")
            self._layer_metrics_defined.add(prefix)

    def _log_layers(self, table: pd.DataFrame, prefix: str) -> None:
        import wandb

        self._define(prefix)
        for row in table.to_dict("records"):
            values = {f"{prefix}{k}": v for k, v in row.items() if k != "layer" and _is_number(v)}
            self.run.log({"layer": int(row["layer"]), **values})
        self.run.log({f"{prefix.rstrip('/')}_table": wandb.Table(dataframe=table)})

    def log_layers(self, table: pd.DataFrame, prefix: str = LAYER_PREFIX) -> None:
        self._guard("per-layer logging", self._log_layers, table, prefix)

    def log_table(self, key: str, table: pd.DataFrame) -> None:
        import wandb

        self._guard("table logging", lambda: self.run.log({key: wandb.Table(dataframe=table)}))

    def log_images(self, paths: Mapping[str, Path]) -> None:
        import wandb

        self._guard("image logging",
                    lambda: self.run.log({k: wandb.Image(str(p)) for k, p in paths.items()}))

    def log_summary(self, values: Mapping[str, Any]) -> None:
        self._guard("summary", lambda: self.run.summary.update(dict(values)))

    def log_artifact(self, name: str, kind: str, paths: list[Path], metadata: Mapping[str, Any]) -> None:
        import wandb

        def _log() -> None:
            artifact = wandb.Artifact(name, type=kind, metadata=dict(metadata))
            for path in paths:
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)

        self._guard("artifact", _log)

    def finish(self, exit_code: int = 0) -> None:
        self._guard("finish", lambda: self.run.finish(exit_code=exit_code))


def _auto_tags(config: Mapping[str, Any]) -> list[str]:
    """The model and dataset names as tags, so runs filter by them in the W&B UI."""
    tags = []
    for group in ("model", "dataset"):
        name = (config.get(group) or {}).get("name") if isinstance(config.get(group), Mapping) else None
        if name:
            tags.append(str(name))
    return tags


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _init_wandb(cfg: Mapping[str, Any], job_dir: Path, name: str, group: str | None,
                job_type: str, config: Mapping[str, Any], mode: str) -> Any:
    import wandb

    tags = list(dict.fromkeys([*(cfg.get("tags") or []), *_auto_tags(config)]))
    return wandb.init(project=cfg.get("project"), entity=cfg.get("entity"), mode=mode,
                      dir=str(cfg.get("dir") or job_dir), name=name, group=group, job_type=job_type,
                      tags=tags, config=dict(config), reinit="finish_previous",
                      settings=wandb.Settings(silent=True, x_disable_stats=True,
                                              init_timeout=float(cfg.get("init_timeout", 90))))


def open_tracker(cfg: Mapping[str, Any], job_dir: Path, name: str, group: str | None,
                 job_type: str, config: Mapping[str, Any]) -> Tracker:
    """Start the tracker named by the ``tracker`` config group."""
    if cfg.get("name") != "wandb" or cfg.get("mode") == "disabled":
        return Tracker()
    mode = str(cfg.get("mode", "offline"))
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        return WandbTracker(_init_wandb(cfg, job_dir, name, group, job_type, config, mode))
    except Exception as err:  # noqa: BLE001
        if mode == "offline":
            warnings.warn(f"W&B could not start ({err}); continuing without tracking", stacklevel=2)
            return Tracker()
        warnings.warn(f"W&B {mode} could not start ({err}); falling back to offline", stacklevel=2)
        try:
            return WandbTracker(_init_wandb(cfg, job_dir, name, group, job_type, config, "offline"))
        except Exception as err2:  # noqa: BLE001
            warnings.warn(f"W&B offline could not start either ({err2}); no tracking", stacklevel=2)
            return Tracker()
