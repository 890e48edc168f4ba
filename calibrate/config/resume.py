"""Reuse of a finished job's folder, by identity: a result is reused only for the same config.

"metrics.json is complete" is not "this config's result exists". A job folder that holds a
complete result is compared with the job about to run through the hash of the result-relevant
config (:func:`calibrate.config.spec.config_hash`, stored in metrics.json as ``config_hash``):

* same hash, ``resume=true``: the result is reused, the job skipped (its ``.hydra/`` untouched);
* another hash (or a result without one), ``resume=true``: the job reruns into the folder, and a
  line names the keys that differ;
* another hash, ``resume=false``: refused; the harness never writes into a folder that holds
  the result of a different config.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from calibrate.config.spec import JobSpec, config_diff
from calibrate.errors import ConfigError
from calibrate.io import results

LOG = logging.getLogger("calibrate")


class FolderInUse(ConfigError):
    """The job folder holds the result of another config (nothing is written to it)."""


def _differences(previous: dict[str, Any], spec: JobSpec, limit: int = 4) -> str:
    if "config" not in previous:
        return "the stored result has no config identity (written by an older calibrate)"
    diff = config_diff(previous["config"], spec.recorded)  # plain containers, not the typed tree
    shown = "; ".join(diff[:limit]) + (f"; and {len(diff) - limit} more" if len(diff) > limit else "")
    return f"differs in {shown}" if diff else "same keys, other hash"


def decide(job_dir: Path, spec: JobSpec, resume: bool) -> dict[str, Any] | None:
    """The stored summary to reuse, or None to run the job. Raises :class:`FolderInUse`."""
    previous = results.read_metrics(job_dir)
    if previous is None:
        return None
    if previous.get("config_hash") == spec.identity:
        if resume:
            LOG.info("resume: %s holds this config's result (%s); skipped", job_dir, spec.identity)
            return previous
        return None  # the same identity: recomputing replaces it with the same result
    why = _differences(previous, spec)
    if not resume:
        raise FolderInUse(f"{job_dir} already holds the result of another config ({why}); "
                          "choose another output folder, or resume=true to recompute it there")
    LOG.warning("resume: %s holds another config's result (%s); rerunning", job_dir, why)
    return None
