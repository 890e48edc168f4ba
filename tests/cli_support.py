"""Subprocess helpers shared by the CLI tests (test_run, test_faults, test_launchers)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from calibrate.model.assets import cache_root

REPO = Path(__file__).resolve().parents[1]  # the checkout under test: its code is what runs
OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
           "MPLBACKEND": "Agg"}
# a second math thread mostly spins on a loaded 2-core machine; results do not depend on it
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    seconds: float  # wall clock
    cpu_seconds: float  # user + system time of the child (and the children it waited for)
    cwd: Path

    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def cli_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """The environment of a CLI subprocess: offline, quiet, no HYDRA_FULL_ERROR, this checkout
    first on PYTHONPATH (the rest of the caller's environment passes through, so the code under
    test runs whatever package is installed); ``extra`` values are set, ``None`` values removed."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OFFLINE)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != REPO]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *paths])
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_process(cmd: Sequence[str], cwd: Path, env: dict[str, str], out_path: Path,
                err_path: Path, timeout: float) -> Run:
    """Run ``cmd`` in ``cwd`` (created), stdout and stderr into the given files, killed after
    ``timeout`` seconds; CPU time by wait4, of this child alone whatever else is running."""
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=out, stderr=err)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
    return Run(os.waitstatus_to_exitcode(status), out_path.read_text(), err_path.read_text(),
               time.perf_counter() - start, usage.ru_utime + usage.ru_stime, cwd)


def isolated_cache(root: Path) -> Path:
    """A cache root of its own for probe and null-space entries; the model, wheels and unpacked
    data are the real cache's (links), so nothing large is prepared again."""
    real = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    for name in ("models", "wheels", "unpacked"):
        (real / name).mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(real / name, target_is_directory=True)
    return root


def explain(run: Run, stdout_chars: int = 0) -> str:
    """Exit status, times and the tail of stderr (and of stdout when ``stdout_chars``)."""
    head = f"exit {run.rc} after {run.seconds:.1f}s ({run.cpu_seconds:.1f}s CPU)\n"
    out = f"--- stdout ---\n{run.stdout[-stdout_chars:]}\n" if stdout_chars else ""
    return f"{head}{out}--- stderr ---\n{run.stderr[-4000:]}"
