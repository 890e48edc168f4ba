"""Hydra launchers: a real sweep through joblib and through submitit's local executor, and the
Slurm GPU launcher config (composed only; no Slurm needed).

The three CLI runs start in the background when the module starts, two at a time. Probe cache
entries go to a throw-away cache root whose model, wheels and unpacked data are links to the
real cache. About a minute of CPU.
"""

from __future__ import annotations

import concurrent.futures
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from cli_support import ONE_THREAD, Run, cli_env, explain, isolated_cache, run_process

from calibrate.io import results

LEAN = ("tracker=none", "probe.progress=false", "output.plots=false", "metrics.bootstrap=0")
SMOL_LAYERS = 31


def cli(argv: list[str], cwd: Path, cache: Path, timeout: float = 600) -> Run:
    """``python -m calibrate.run <argv>`` in ``cwd``, offline, with its own cache root."""
    env = cli_env({**ONE_THREAD, "CALIBRATE_CACHE": str(cache)})
    return run_process([sys.executable, "-m", "calibrate.run", *argv], cwd, env,
                       cwd.parent / f".{cwd.name}.stdout", cwd.parent / f".{cwd.name}.stderr",
                       timeout)


def _sweep(root: Path, cache: Path, launcher: list[str], limits: str) -> tuple[Run, Path]:
    sweep = root / "sweep"
    run = cli(["-m", *launcher, f"dataset.limit={limits}", *LEAN, f"hydra.sweep.dir={sweep}"],
              root / "cwd", cache, timeout=400)
    return run, sweep


RUNS = {
    "joblib": lambda root, cache: _sweep(root, cache, ["hydra/launcher=joblib",
                                                       "hydra.launcher.n_jobs=2"], "4,5"),
    # one job: submitit pickles the task, starts a fresh process and waits for its result
    "submitit": lambda root, cache: _sweep(root, cache, ["hydra/launcher=submitit_local",
                                                         "hydra.launcher.timeout_min=5"], "4"),
    "slurm_cfg": lambda root, cache: (cli(["hydra/launcher=slurm_gpu",
                                           "hydra.launcher.partition=gpu", "--cfg", "hydra"],
                                          root / "cwd", cache), None),
}
TEST_KEYS = {"test_joblib_sweep": "joblib", "test_submitit_local_sweep": "submitit",
             "test_slurm_gpu_launcher_composes": "slurm_cfg"}


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
    """Start the runs the selected tests need, two at a time, when the module starts."""
    cache = isolated_cache(tmp_path_factory.mktemp("cache"))
    wanted = {TEST_KEYS[getattr(item, "originalname", item.name)] for item in request.session.items
              if Path(item.path) == Path(__file__)
              and getattr(item, "originalname", item.name) in TEST_KEYS}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures = {key: pool.submit(RUNS[key], tmp_path_factory.mktemp(key), cache)
               for key in RUNS if key in wanted}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def check_sweep(sweep: Path, limits: list[int]) -> pd.DataFrame:
    """Every job complete, and summary.csv has one complete row per job equal to its metrics."""
    table = pd.read_csv(sweep / "summary.csv")
    assert list(table["job"]) == list(range(len(limits)))
    assert list(table["status"]) == ["complete"] * len(limits)
    for index, n in enumerate(limits):
        job_dir = sweep / str(index)
        metrics = results.read_metrics(job_dir)
        assert metrics is not None, job_dir
        assert metrics["n_examples"] == n and metrics["model"] == "smollm2"
        assert len(pd.read_csv(job_dir / "layers.csv")) == SMOL_LAYERS
        row = table.loc[index]
        assert f"dataset.limit={n}" in row["overrides"]
        assert row["n_examples"] == n
        for key, value in metrics["final"].items():
            if value is None or pd.isna(row[key]):
                assert value is None or pd.isna(value), key
            else:
                assert row[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    return table


def test_joblib_sweep(background):
    run, sweep = background["joblib"].result()
    assert run.rc == 0, explain(run, 2000)
    assert "Joblib.Parallel(n_jobs=2" in run.stderr + run.stdout, explain(run, 2000)
    assert "sweep: 2 jobs: 2 complete;" in run.stderr, explain(run, 2000)
    check_sweep(sweep, [4, 5])
    multirun = yaml.safe_load((sweep / "multirun.yaml").read_text())
    assert multirun["hydra"]["launcher"]["n_jobs"] == 2


def test_submitit_local_sweep(background):
    """The task is pickled and run by submitit in its own process (its log holds the job's
    output), then summarized like any sweep."""
    run, sweep = background["submitit"].result()
    assert run.rc == 0, explain(run, 2000)
    assert "sweep: 1 jobs: 1 complete;" in run.stderr, explain(run, 2000)
    check_sweep(sweep, [4])
    logs = list((sweep / ".submitit").glob("*/*_log.err"))
    assert len(logs) == 1, list((sweep / ".submitit").rglob("*"))
    assert f"results in {sweep / '0'}" in logs[0].read_text()


def test_slurm_gpu_launcher_composes(background):
    """``hydra/launcher=slurm_gpu``: one GPU per job through submitit's Slurm launcher."""
    run, _ = background["slurm_cfg"].result()
    assert run.rc == 0, explain(run, 2000)
    launcher = yaml.safe_load(run.stdout)["hydra"]["launcher"]
    assert launcher["_target_"] == ("hydra_plugins.hydra_submitit_launcher.submitit_launcher."
                                    "SlurmLauncher")
    assert launcher["gpus_per_node"] == 1
    assert (launcher["tasks_per_node"], launcher["nodes"]) == (1, 1)
    assert launcher["cpus_per_task"] == 8 and launcher["mem_gb"] == 64
    assert launcher["timeout_min"] == 240 and launcher["array_parallelism"] == 64
    assert launcher["partition"] == "gpu"  # the documented override composes
    assert launcher["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    assert json.dumps(launcher)  # plain data: nothing Slurm-specific was needed to compose it
