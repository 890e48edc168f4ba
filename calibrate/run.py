"""Hydra entry point: ``python -m calibrate.run [-m] key=value ...``.

The command line is checked first (:mod:`calibrate.config.preflight`): every swept value is composed and
its spec built, so bad input ends in one line on stderr naming the value and what is accepted,
exit status 2, before any job starts (``HYDRA_FULL_ERROR=1`` brings tracebacks back). Each job
takes its folder (:class:`~calibrate.io.results.JobLock`: a folder another running job holds is
refused in one line), builds its spec, checks the folder (:mod:`calibrate.config.resume`), writes
``.hydra/`` and runs.
In a multirun a failing job is recorded (``error.json`` in its directory, a ``failed`` row in
``summary.csv``) and the other jobs go on; a refused job (its folder is another config's or
another job's) writes nothing there and shows as ``refused``. The command exits 1 when any job
failed, else 2 when any was refused.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import calibrate.studies  # noqa: F401 - the studies' intervention options
from calibrate.config import CONF_DIR, resume, schema
from calibrate.config.spec import build_spec
from calibrate.errors import USER_ERRORS, one_line
from calibrate.io import results, summary
from calibrate.job import clear_results, run_job

LOG = logging.getLogger("calibrate")
schema.register()  # the typed root, before Hydra composes (config.yaml's defaults list it)


def _job_context() -> tuple[Path, str, str | None, bool]:
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    name = f"{hc.runtime.choices.get('model')}-{hc.runtime.choices.get('dataset')}"
    if hc.overrides.task:
        name += "-" + ",".join(hc.overrides.task)
    group = Path(hc.sweep.dir).name if multirun else name
    return job_dir, name, group, multirun


def _write_hydra_files(cfg: DictConfig, job_dir: Path) -> None:
    """``.hydra/`` as Hydra writes it (config, hydra, overrides), only for a job that runs."""
    hc = HydraConfig.get()
    folder = job_dir / ".hydra"
    results.write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    results.write_text(folder / "hydra.yaml", OmegaConf.to_yaml({"hydra": hc}))
    results.write_text(folder / "overrides.yaml", OmegaConf.to_yaml(list(hc.overrides.task)))


def _headline(done: dict[str, Any], job_dir: Path) -> None:
    final = done.get("final", {})

    def interval(metric: str) -> str:
        lo, hi = final.get(f"{metric}_lo"), final.get(f"{metric}_hi")
        return f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""

    mass = final.get("option_mass")
    mass = "" if mass is None or math.isnan(mass) else f" (options hold {mass:.1%} of the mass)"
    LOG.info("%s on %s (%s, %d examples): final accuracy %.3f%s, ECE %.4f%s%s, MCE %.4f; %s",
             done.get("model"), done.get("dataset"), done.get("study"), done.get("n_examples", 0),
             final.get("accuracy", float("nan")), interval("accuracy"),
             final.get("ece", float("nan")), interval("ece"), mass, final.get("mce", float("nan")),
             done.get("phase_note") or "")
    for line in done.get("headline_extra") or []:
        LOG.info("%s", line)
    LOG.info("results in %s", job_dir)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> dict | None:
    """Run one job, owning its folder for the whole job (a folder another job holds is refused:
    a user error, nothing written); see the module docstring for error handling."""
    logging.captureWarnings(True)
    job_dir, name, group, multirun = _job_context()
    try:
        lock = results.JobLock(job_dir).acquire()
    except results.OutputError as err:
        return _fail(job_dir, err, multirun, user_error=True, record=False)
    with lock:
        return _run(cfg, job_dir, name, group, multirun)


def _run(cfg: DictConfig, job_dir: Path, name: str, group: str | None,
         multirun: bool) -> dict | None:
    try:
        spec = build_spec(cfg)
        group = spec.tracker.group or group
        done = resume.decide(job_dir, spec, spec.config.resume)
        if done is not None:
            return done
        results.check_writable(job_dir)
        clear_results(job_dir)  # a rerun leaves nothing of an earlier result or failure
        _write_hydra_files(cfg, job_dir)
        done = run_job(spec, job_dir, name=name, group=group)
    except resume.FolderInUse as err:
        return _fail(job_dir, err, multirun, user_error=True, record=False)
    except USER_ERRORS as err:
        return _fail(job_dir, err, multirun, user_error=True)
    except Exception as err:  # noqa: BLE001 - recorded, then re-raised outside a multirun
        if not multirun or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        return _fail(job_dir, err, multirun, user_error=False)
    _headline(done, job_dir)
    return done


def _fail(job_dir: Path, err: BaseException, multirun: bool, user_error: bool,
          record: bool = True) -> None:
    if user_error and os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    LOG.error("error: %s", one_line(err))
    if not multirun:
        sys.exit(2 if user_error else 1)
    if record:  # in a sweep the failure is recorded for summary.csv; it is not a result
        results.write_json(job_dir / results.ERROR_FILE, {
            "status": "failed", "error_type": type(err).__name__, "error": str(err),
            "traceback": "" if user_error else traceback.format_exc()})
    else:  # refused: nothing goes into the folder; the sweep's summary shows it as refused
        hc = HydraConfig.get()
        summary.record_refusal(Path(hc.sweep.dir), job_dir, list(hc.overrides.task), err)
    return None


def cli(argv: list[str] | None = None) -> None:
    """``python -m calibrate.run``: preflight, Hydra, then the exit status of the sweep."""
    from calibrate.preflight import PREFLIGHT_ERRORS, preflight

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = preflight(argv)
    except PREFLIGHT_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *argv]
    main()
    status = summary.exit_status(summary.LAST_TALLY)  # 1: a job failed; 2: one was refused
    if status:
        sys.exit(status)


if __name__ == "__main__":
    cli()
