"""Hydra entry point: ``python -m calibrate.run [-m] key=value ...``.

A thin layer over :func:`calibrate.job.run_job`. Bad input ends in one line on stderr naming
the value and what is accepted, exit status 2, and no result files. In a multirun a failing
job is recorded (``error.json`` in its directory, a ``failed`` row in ``summary.csv``) and
the other jobs go on.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from calibrate import results
from calibrate.errors import USER_ERRORS
from calibrate.job import run_job

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _job_context() -> tuple[Path, str, str | None, bool]:
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    group = Path(hc.sweep.dir).name if multirun else None
    name = f"{hc.runtime.choices.get('model')}-{hc.runtime.choices.get('dataset')}"
    if hc.overrides.task:
        name += "-" + ",".join(hc.overrides.task)
    return job_dir, name, group, multirun


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> dict | None:
    """Run one job; see the module docstring for error handling."""
    job_dir, name, group, multirun = _job_context()
    if cfg.tracker.get("group"):
        group = cfg.tracker.group
    done = results.read_metrics(job_dir) if cfg.get("resume") is True else None  # else validated
    if done is not None:
        print(f"[calibrate] resume: {job_dir} is complete, skipped", file=sys.stderr)
        return done
    (job_dir / results.ERROR_FILE).unlink(missing_ok=True)  # a rerun replaces an earlier failure
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
        summary = run_job(container, job_dir, name=name, group=group, config_dict=container)
    except USER_ERRORS as err:
        return _fail(job_dir, err, multirun, user_error=True)
    except Exception as err:  # noqa: BLE001 - recorded, then re-raised outside a multirun
        if not multirun:
            raise
        return _fail(job_dir, err, multirun, user_error=False)
    print(f"[calibrate] results in {job_dir}  (layers.csv, metrics.json, plots)", file=sys.stderr)
    return summary


def _fail(job_dir: Path, err: BaseException, multirun: bool, user_error: bool) -> None:
    print(f"error: {err}", file=sys.stderr)
    if not multirun:
        sys.exit(2 if user_error else 1)
    # In a sweep the failure is recorded for summary.csv; it is not a result.
    results.write_json(job_dir / results.ERROR_FILE, {
        "status": "failed", "error_type": type(err).__name__, "error": str(err),
        "traceback": "" if user_error else traceback.format_exc()})
    return None


if __name__ == "__main__":
    main()
