"""Experiment tracking: Weights & Biases or nothing.

What a W&B workspace shows without setting up a panel: every per-layer series is logged with
``layer`` as its step metric (``define_metric("layer/*", step_metric="layer")``, likewise
``steered/eta=<η>/*``, ``baselines/<method>/*``, ``ablation/<variant>/*``), so W&B draws each
metric against the layer and overlays the runs of a group in one chart; a steering table also
gives ``eta/<metric>`` over ``eta`` (its last layer); the direction is an artifact with its
metadata.

A tracker failure never fails a job or loses local results: an unreachable W&B falls back to
offline mode with a warning, and any logging error is reported and ignored. The run is always
finished (the job calls :meth:`Tracker.finish` in ``finally``).

The W&B run opens lazily: what the job logs is kept in memory and the run is created, filled
and finished only by ``finish(exit_code=0)``. A job that fails or is interrupted before its
results exist (``finish(exit_code != 0)``, or killed outright) leaves no run behind, so nothing
empty or partial is synced later. Its group is the sweep (``tracker.group`` if set), or the
job's name for a single run; its job type is the intervention.

Offline runs live in ``<job dir>/wandb/offline-run-*`` (``<tracker.dir>/wandb/...`` when
``tracker.dir`` is set). Sync them later with::

    wandb sync outputs/<date>/<time>_<model>_<dataset>/wandb/offline-run-*    # one job
    wandb sync multirun/<date>/<time>/*/wandb/offline-run-*                   # every job of a sweep
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from calibrate import values
from calibrate.errors import ConfigError

TRACKERS = ("wandb", "none")
TRACKER_MODES = ("offline", "online", "disabled")


@dataclass
class TrackerSettings:
    """The ``tracker`` group: where (and whether) a job is logged."""

    name: str = "none"
    project: str | None = "calibrate"
    entity: str | None = None
    mode: str = "offline"
    group: str | None = None
    tags: tuple[str, ...] = ()
    dir: str | None = None
    init_timeout: float = 90.0

    def __post_init__(self) -> None:
        values.choice("tracker", self.name, TRACKERS)
        if self.name == "wandb":
            values.choice("tracker.mode", self.mode, TRACKER_MODES)
        for key in ("project", "entity", "group", "dir"):
            values.optional_text(f"tracker.{key}", getattr(self, key))
        if isinstance(self.tags, str) or not all(isinstance(tag, str) for tag in self.tags):
            raise ConfigError(f"tracker.tags={self.tags!r}; accepted: a list of strings")
        self.tags = tuple(self.tags)
        self.init_timeout = values.number("tracker.init_timeout", self.init_timeout,
                                          lambda s: s > 0, "a number of seconds > 0")


LAYER_PREFIX = "layer/"
ETA_PREFIX = "eta/"  # final-layer metrics over eta, from a table over eta and layer
SYNC_GLOB = "*/wandb/offline-run-*"  # under a sweep folder: every job's offline run


class Tracker:
    """Logs nothing; the base of the real trackers (``tracker=none``)."""

    def log_layers(self, table: pd.DataFrame, prefix: str = LAYER_PREFIX) -> None:
        """Log each per-layer column as a series over ``layer``, plus the table itself."""

    def log_series(self, name: str, table: pd.DataFrame | Mapping[str, Mapping[Any, float]],
                   x: str = "layer") -> None:
        """Log each column as the series ``<name>/<column>`` over ``x``, plus ``<name>_table``.

        ``table`` is a DataFrame with an ``x`` column, or ``{column: {x value: value}}``, e.g.
        ``{"rho": {30: 0.01, 31: 0.02}, "norm": {30: 4.1, 31: 3.9}}``.
        """

    def log_table(self, key: str, table: pd.DataFrame) -> None:
        """Log a table. A table over ``eta`` and ``layer`` (the steering table) also gives its
        last layer's metrics as the series ``eta/<metric>`` over ``eta``."""

    def log_images(self, paths: Mapping[str, Path]) -> None:
        """Log PNG files under their keys."""

    def log_summary(self, values: Mapping[str, Any]) -> None:
        """Set summary values (the same names in every run)."""

    def log_artifact(self, name: str, kind: str, paths: list[Path], metadata: Mapping[str, Any]) -> None:
        """Store files as a versioned artifact."""

    def finish(self, exit_code: int = 0) -> None:
        """Close the run."""


def eta_curves(table: pd.DataFrame) -> pd.DataFrame | None:
    """The last layer's rows of a table over ``eta`` and ``layer``, one per η, without the
    ``layer`` column; None for any other table."""
    if not {"eta", "layer"} <= set(table.columns) or table.empty:
        return None
    final = table[table["layer"] == table["layer"].max()].drop(columns="layer")
    return final.drop_duplicates("eta").sort_values("eta").reset_index(drop=True)


def series_table(table: pd.DataFrame | Mapping[str, Mapping[Any, float]], x: str) -> pd.DataFrame:
    """``table`` as a DataFrame with an ``x`` column, sorted by it."""
    if not isinstance(table, pd.DataFrame):
        table = pd.DataFrame({str(k): pd.Series(dict(v), dtype=float) for k, v in table.items()})
        table = table.rename_axis(x).reset_index()
    if x not in table.columns:
        raise ValueError(f"series table has no {x!r} column: {list(table.columns)}")
    return table.sort_values(x, kind="stable").reset_index(drop=True)


class WandbTracker(Tracker):
    """A W&B run, opened by ``open_run()`` at ``finish(0)``; every call is guarded so tracking
    never breaks a job."""

    def __init__(self, open_run: Callable[[], Any]) -> None:
        self._open_run = open_run
        self.run: Any = None
        self._pending: list[tuple[str, Callable[[], None]]] = []
        self._defined: set[tuple[str, str]] = set()
        self._finished = False

    def _guard(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - tracking must never fail the job
            warnings.warn(f"W&B {what} failed ({err}); local results are unaffected", stacklevel=3)

    def _later(self, what: str, fn: Callable[[], None]) -> None:
        if self._finished:
            warnings.warn(f"W&B {what} after finish() is ignored", stacklevel=3)
            return
        self._pending.append((what, fn))

    def _define(self, name: str, x: str) -> None:
        if ("x", x) not in self._defined:
            self.run.define_metric(x)
            self._defined.add(("x", x))
        if ("series", name) not in self._defined:
            self.run.define_metric(f"{name}/*", step_metric=x)
            self._defined.add(("series", name))

    def _log_series(self, name: str, table: pd.DataFrame, x: str) -> None:
        import wandb

        self._define(name, x)
        for row in table.to_dict("records"):
            values = {f"{name}/{k}": v for k, v in row.items() if k != x and _is_number(v)}
            self.run.log({x: row[x], **values})
        self.run.log({f"{name}_table": wandb.Table(dataframe=table)})

    def log_series(self, name: str, table: pd.DataFrame | Mapping[str, Mapping[Any, float]],
                   x: str = "layer") -> None:
        try:
            frame = series_table(table, x).copy()
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"W&B series {name!r} not logged ({err})", stacklevel=2)
            return
        if frame.empty:
            return
        name = name.rstrip("/")
        self._later(f"{name} logging", lambda: self._log_series(name, frame, x))

    def log_layers(self, table: pd.DataFrame, prefix: str = LAYER_PREFIX) -> None:
        self.log_series(prefix, table, "layer")

    def log_table(self, key: str, table: pd.DataFrame) -> None:
        import wandb

        frame = table.copy()
        self._later("table logging", lambda: self.run.log({key: wandb.Table(dataframe=frame)}))
        curves = eta_curves(frame)
        if curves is not None:
            self.log_series(ETA_PREFIX, curves, x="eta")

    def log_images(self, paths: Mapping[str, Path]) -> None:
        import wandb

        paths = dict(paths)
        self._later("image logging",
                    lambda: self.run.log({k: wandb.Image(str(p)) for k, p in paths.items()}))

    def log_summary(self, values: Mapping[str, Any]) -> None:
        values = dict(values)
        self._later("summary", lambda: self.run.summary.update(values))

    def log_artifact(self, name: str, kind: str, paths: list[Path], metadata: Mapping[str, Any]) -> None:
        import wandb

        paths, metadata = list(paths), dict(metadata)

        def _log() -> None:
            artifact = wandb.Artifact(name, type=kind, metadata=metadata)
            for path in paths:
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)

        self._later("artifact", _log)

    def finish(self, exit_code: int = 0) -> None:
        """With exit code 0: open the run, log everything kept, finish it. Otherwise: drop it
        all and create no run."""
        if self._finished:
            return
        self._finished = True
        pending, self._pending = self._pending, []
        if exit_code != 0:
            return
        self.run = self._open_run()
        if self.run is None:
            return
        try:
            for what, fn in pending:
                self._guard(what, fn)
        except BaseException:  # interrupted while logging: still finish the run, then go on
            self._guard("finish", lambda: self.run.finish(exit_code=1))
            raise
        self._guard("finish", lambda: self.run.finish(exit_code=0))


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


def _init_wandb(cfg: TrackerSettings, job_dir: Path, name: str, group: str | None,
                job_type: str, config: Mapping[str, Any], mode: str) -> Any:
    import wandb

    tags = list(dict.fromkeys([*cfg.tags, *_auto_tags(config)]))
    return wandb.init(project=cfg.project, entity=cfg.entity, mode=mode,
                      dir=str(cfg.dir or job_dir), name=name, group=group, job_type=job_type,
                      tags=tags, config=dict(config), reinit="finish_previous",
                      settings=wandb.Settings(silent=True, x_disable_stats=True,
                                              init_timeout=cfg.init_timeout))


def _start(cfg: TrackerSettings, job_dir: Path, name: str, group: str | None, job_type: str,
           config: Mapping[str, Any], mode: str) -> Any:
    """The W&B run, falling back from online to offline; None (with a warning) if neither starts."""
    try:
        return _init_wandb(cfg, job_dir, name, group, job_type, config, mode)
    except Exception as err:  # noqa: BLE001
        if mode == "offline":
            warnings.warn(f"W&B could not start ({err}); continuing without tracking", stacklevel=3)
            return None
        warnings.warn(f"W&B {mode} could not start ({err}); falling back to offline", stacklevel=3)
    try:
        return _init_wandb(cfg, job_dir, name, group, job_type, config, "offline")
    except Exception as err2:  # noqa: BLE001
        warnings.warn(f"W&B offline could not start either ({err2}); no tracking", stacklevel=3)
        return None


def open_tracker(cfg: TrackerSettings, job_dir: Path, name: str,
                 group: str | None, job_type: str, config: Mapping[str, Any]) -> Tracker:
    """The tracker named by the ``tracker`` config group. ``group`` None (a single run) means
    the job's ``name``. The W&B run itself starts at ``finish(exit_code=0)``."""
    if cfg.name != "wandb" or cfg.mode == "disabled":
        return Tracker()
    mode = cfg.mode
    os.environ.setdefault("WANDB_SILENT", "true")
    group = group or name
    config = dict(config)
    return WandbTracker(lambda: _start(cfg, Path(job_dir), name, group, job_type, config, mode))
