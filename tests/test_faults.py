"""Faults: resume, SIGKILL, runtime failures in a sweep, non-finite activations, out-of-memory
halving, an unreachable W&B, damaged caches, determinism, safety and bad input for every CLI.

Every job runs on the real SmolLM2-135M with a handful of examples. Probe and null-space cache
entries go to throw-away cache roots whose ``models``, ``wheels`` and ``unpacked`` folders are
links to the real cache (see :func:`isolated_cache`): no test reads or damages an entry of the
user's cache, and every probe is really computed the first time. The independent CLI runs start
in the background when the module starts, two at a time (:func:`background`); the resume and
kill tests run their subprocesses in the test itself. About 2.5 minutes of CPU in all.
"""

from __future__ import annotations

import ast
import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_support import ONE_THREAD, Run, cli_env, explain, isolated_cache, run_process
from omegaconf import OmegaConf, open_dict

from calibrate import job as job_mod
from calibrate.engine import cache as probe_cache
from calibrate.engine import probe as probe_mod
from calibrate.io import results
from calibrate.io import summary as summary_mod
from calibrate.io.summary import summarize_sweep
from calibrate.model.adapters import block_hidden, replace_block_hidden

REPO = Path(__file__).resolve().parents[1]
LEAN = ("tracker=none", "probe.progress=false", "output.plots=false", "metrics.bootstrap=0")
RESULT_NAMES = ("layers.csv", "metrics.json", "predictions.npz", "error.json")
TEMP_NAME = re.compile(r"^\..+\.tmp$")  # results.atomic_write's temporary names
PNG_MAGIC, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"
SMOL_LAYERS = 31
WEIGHTS_MARKER = "Loading weights"
QUICK_S = 60  # CPU seconds: bad input ends long before a model is loaded and probed
KILL_LIMIT = 12  # examples of the killed job: its probe takes a few CPU seconds (120 take ~90)
FAKE_KEY = "dummy" * 8  # 40 characters: W&B accepts its form and really tries the server
# One math thread per process: on a loaded 2-core machine a second one mostly spins (a probe of
# 6 prompts took 5-9 CPU s with 2 threads, 1.3 s with 1) and the results do not depend on it.
# ---------------------------------------------------------------- helpers

def cli(argv: list[str], cwd: Path, env: dict[str, str | None] | None = None,
        timeout: float = 600) -> Run:
    """``python -m <argv>`` in ``cwd``; stdout and stderr are captured beside ``cwd``."""
    return run_process([sys.executable, "-m", *argv], cwd, cli_env({**ONE_THREAD, **(env or {})}),
                       cwd.parent / f".{cwd.name}.stdout", cwd.parent / f".{cwd.name}.stderr",
                       timeout)


def check_no_truncated_files(job_dir: Path) -> list[str]:
    """Every file without the temporary prefix is whole (parses); returns the names checked."""
    checked = []
    for path in sorted(p for p in job_dir.iterdir() if p.is_file()):
        if TEMP_NAME.match(path.name):
            continue
        if path.suffix == ".csv":
            assert len(pd.read_csv(path)) > 0, path
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                assert all(data[name].size >= 0 for name in data.files), path
        elif path.suffix == ".png":
            raw = path.read_bytes()
            assert raw.startswith(PNG_MAGIC) and raw.endswith(PNG_END), f"truncated png {path}"
        elif path.suffix == ".json":
            json.loads(path.read_text())
        checked.append(path.name)
    return checked


def sweep_summary(sweep: Path) -> pd.DataFrame:
    return pd.read_csv(sweep / "summary.csv")


def assert_row_matches_metrics(row: pd.Series, job_dir: Path) -> None:
    metrics = results.read_metrics(job_dir)
    assert metrics is not None, job_dir
    assert row["status"] == "complete" and row["n_examples"] == metrics["n_examples"]
    for key in ("accuracy", "ece", "mce", "brier", "nll"):
        assert row[key] == pytest.approx(metrics["final"][key], rel=1e-12, abs=1e-15), key


CACHE_ENTRY = re.compile(r"^[0-9a-f]{64}\.(npz|safetensors)$")  # probe / null-space entries
JOB_PARTS = {".hydra", "wandb", "probe", "nullspace"}


def repo_files() -> set[Path]:
    """Files in the working tree that look written by a job or a cache: cache entries, Hydra and
    W&B folders, result files. (Sources that others edit meanwhile, and the background
    experiment's ``experiments/`` folder, are not looked at.)"""
    skip_dirs = {".git", ".venv", "__pycache__", ".pytest_cache", "experiments"}
    found = set()
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath) / name
            if (CACHE_ENTRY.match(name) or name in (*RESULT_NAMES, "run.log")
                    or JOB_PARTS & set(path.relative_to(REPO).parts)):
                found.add(path)
    return found


# ---------------------------------------------------------------- bad input for every CLI

@dataclass(frozen=True)
class Bad:
    id: str
    argv: tuple[str, ...]  # after ``python -m``; "{tmp}" is the case's folder
    rc: int
    names: tuple[str, ...]  # what the last stderr line must name
    accepts: tuple[str, ...] = ()  # what stderr must offer instead
    lines: int | None = 1  # non-empty stderr lines; None: argparse's usage (any length) then the error
    files: dict = field(default_factory=dict, hash=False, compare=False)  # made before the run


RUN = ("calibrate.run", "dataset.limit=4", *LEAN, "hydra.run.dir={tmp}/out")
PREVIOUS = json.dumps({"status": "complete", "marker": "an earlier complete result"})
BAD = [
    Bad("compare_missing_dir", ("calibrate", "compare", "{tmp}/nonexistent"), 2,
        ("{tmp}/nonexistent", "no such directory"), ("sweep directory",)),
    Bad("bench_n_zero", ("calibrate", "bench", "--n", "0"), 2, ("--n must be >= 1, got 0",), lines=None),
    Bad("bench_rounds_negative", ("calibrate", "bench", "probe", "--rounds", "-1"), 2,
        ("--rounds must be >= 1, got -1",), lines=None),
    # an unknown asset is bad input: one line and exit status 2, as for every subcommand
    Bad("assets_unknown", ("calibrate", "assets", "prepare", "nosuchmodel"), 2,
        ("'nosuchmodel'",), ("'data'", "smollm2", "gemma3_270m")),
    Bad("direction_method", (*RUN, "intervention=steering", "direction.method=ica"), 2,
        ("direction.method='ica'",), ("layer_diff", "mean_diff", "random")),
    Bad("intervention_position", (*RUN, "intervention=steering", "intervention.position=middle"),
        2, ("intervention.position='middle'",), ("last, all",)),
    Bad("calibration_fraction", (*RUN, "direction.calibration_fraction=2"), 2,
        ("direction.calibration_fraction=2",), ("strictly between 0 and 1",)),
    Bad("nullspace_fraction", (*RUN, "intervention=nullspace", "nullspace.fraction=0"), 2,
        ("nullspace.fraction=0",), ("(0, 1]",)),
    Bad("bootstrap_negative", (*RUN, "metrics.bootstrap=-1"), 2, ("metrics.bootstrap=-1",),
        ("integer >= 0",)),
    # issue 25: the statistics' settings
    Bad("correction_unknown", (*RUN, "metrics.correction=fdr"), 2, ("metrics.correction='fdr'",),
        ("holm, bh, bonferroni, none",)),
    Bad("null_unknown", (*RUN, "intervention=steering", "direction.null=gauss"), 2,
        ("direction.null='gauss'",), ("isotropic, covariance",)),
    Bad("match_unknown", (*RUN, "intervention=steering", "direction.match=l2"), 2,
        ("direction.match='l2'",), ("kl, confidence, none",)),
    Bad("eta_fit_without_a_fitted_norm", (*RUN, "eta=[0,fit]"), 2,
        ("eta=fit steers a direction at its fitted norm", "direction.method=layer_diff"),
        ("direction.method=gradient",)),
    # Over a directory that already holds a complete result: "maybe" must neither skip the job
    # (it is not true) nor run it (it is not false). OmegaConf parses booleans against the
    # typed schema: "maybe" is refused while composing.
    Bad("resume_maybe", (*RUN, "resume=maybe"), 2, ("resume=maybe",), ("not a valid bool",),
        files={"out/metrics.json": PREVIOUS}),
    # issue 23: each class of bad input ends in one line, exit 2, nothing written
    Bad("seed_negative", (*RUN, "seed=-1"), 2, ("seed=-1",), ("an integer >= 0",)),
    Bad("unknown_key_added", (*RUN, "+metrics.nbins=5"), 2,
        ("metrics.nbins is not a config key (also when added with +)",), ("n_bins",)),
    Bad("eta_overflow", (*RUN, "eta=1e308"), 2, ("eta=1e+308 overflows",), ("|eta| <",)),
    Bad("remote_code_maybe", (*RUN, "model.trust_remote_code=maybe"), 2,
        ("model.trust_remote_code=maybe",), ("not a valid bool",)),
    Bad("subject_list", (*RUN, "dataset.subject=[physics,chemistry]"), 2,
        ("dataset.subject=[physics,chemistry]",)),
    Bad("output_root_a_file", (*RUN, "hydra.run.dir={tmp}/afile/out"), 2,
        ("hydra.run.dir='{tmp}/afile/out'", "is not a writable folder"),
        files={"afile": "not a folder"}),
]


def _bad_run(case: Bad, tmp: Path) -> tuple[Run, set[Path]]:
    for name, text in case.files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    before = {p for p in tmp.rglob("*") if p.is_file()}
    argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
    return cli(argv, tmp, env={"CALIBRATE_CACHE": str(tmp / "cache")}), before


# ---------------------------------------------------------------- background runs

def _runtime_failure_sweep(root: Path, cache: Path) -> tuple[Run, Path]:
    """A sweep of a model folder whose weights file is damaged (a valid config and tokenizer:
    every check passes and reading the weights fails) and of the good model."""
    from calibrate.api import typed_config
    from calibrate.model.load import resolve_source

    good = Path(resolve_source(typed_config([]).model, cache))
    bad = root / "damaged_model"
    bad.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(good / name, bad / name)
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)  # a header length of 2**64 - 1
    sweep = root / "sweep"
    run = cli(["calibrate.run", "-m", f"model.path={bad},null", "dataset.limit=4", *LEAN,
               f"hydra.sweep.dir={sweep}"], root / "cwd", env={"CALIBRATE_CACHE": str(cache)})
    return run, sweep


def _wandb_unreachable_job(root: Path) -> dict:
    """A null-space job with ``tracker.mode=online`` and W&B pointed at a closed port; run from
    a fresh working directory with its own cache root (default ``cache_dir``, from the env)."""
    cache = isolated_cache(root / "cache")
    cwd = root / "cwd"
    out = cwd / "out"
    before = repo_files()
    run = cli(["calibrate.run", "intervention=nullspace", "nullspace.n_random=10",
               "dataset.limit=4",
               "tracker=wandb", "tracker.mode=online", "probe.progress=false", "output.plots=false",
               "metrics.bootstrap=0", f"hydra.run.dir={out}"], cwd, timeout=420,
              env={"CALIBRATE_CACHE": str(cache), "WANDB_MODE": None,
                   "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": FAKE_KEY,
                   "WANDB_INIT_TIMEOUT": "15"})
    return {"run": run, "out": out, "cwd": cwd, "cache": cache,
            "new_repo_files": sorted(repo_files() - before)}


TEST_KEYS = {"test_runtime_failure_in_a_sweep_is_recorded": "runtime",
             "test_unreachable_wandb_still_completes": "wandb",
             "test_caches_are_written_under_the_cache_root": "wandb"}


def _wanted(session, module_file: str) -> list[str]:
    keys = []
    for item in session.items:
        if Path(item.path) != Path(module_file):
            continue
        name = getattr(item, "originalname", item.name)
        if name in TEST_KEYS:
            keys.append(TEST_KEYS[name])
        elif name == "test_bad_input_cli":
            keys.append(item.callspec.params["case"].id)
    order = ["wandb", "runtime", *(c.id for c in BAD)]
    return sorted(set(keys), key=order.index)


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
    """Start this module's independent CLI runs, two at a time, when the module starts."""
    cache = isolated_cache(tmp_path_factory.mktemp("bg_cache"))
    jobs: dict[str, Callable[[], object]] = {
        "wandb": lambda: _wandb_unreachable_job(tmp_path_factory.mktemp("wandb")),
        "runtime": lambda: _runtime_failure_sweep(tmp_path_factory.mktemp("runtime"), cache),
    }
    for case in BAD:
        jobs[case.id] = (lambda c=case: _bad_run(c, tmp_path_factory.mktemp(c.id)))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures = {key: pool.submit(jobs[key]) for key in _wanted(request.session, __file__)}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_input_cli(case, background):
    """Exit status, one clear message naming the value, no result files, no weights read."""
    run, before = background[case.id].result()
    tmp = run.cwd
    names = [n.replace("{tmp}", str(tmp)) for n in case.names]
    lines = run.lines()
    assert run.rc == case.rc, explain(run)
    assert "Traceback" not in run.stderr, explain(run)
    assert case.lines is None or len(lines) == case.lines, explain(run)
    assert all(n in lines[-1] for n in names), explain(run)
    assert all(a in run.stderr for a in case.accepts), explain(run)
    assert WEIGHTS_MARKER not in run.stderr, explain(run)
    assert run.cpu_seconds < QUICK_S, explain(run)
    # nothing written but Hydra's own record of the run (.hydra/, run.log)
    new = {p for p in tmp.rglob("*") if p.is_file()} - before
    written = [p for p in new if ".hydra" not in p.parts and p.name != "run.log"]
    assert not written, written
    for name, text in case.files.items():
        assert (tmp / name).read_text() == text, f"{name} was changed"


def test_runtime_failure_in_a_sweep_is_recorded(background):
    """A job whose weights cannot be read fails at run time; the next job still completes, and
    the sweep exits 1 with a one-line tally."""
    run, sweep = background["runtime"].result()
    assert run.rc == 1, explain(run)
    assert "sweep: 2 jobs: 1 complete, 1 failed" in run.lines()[-1], explain(run)
    table = sweep_summary(sweep)
    assert list(table["status"]) == ["failed", "complete"], table
    assert "damaged_model" in table.loc[0, "overrides"]
    damaged = str(sweep.parent / "damaged_model" / "model.safetensors")
    assert table.loc[0, "error"].startswith("ModelConfigError: weights file"), table.loc[0, "error"]
    assert damaged in table.loc[0, "error"] and "corrupt" in table.loc[0, "error"]
    error = json.loads((sweep / "0" / "error.json").read_text())
    assert error["status"] == "failed" and error["error_type"] == "ModelConfigError"
    assert error["traceback"] == ""  # bad input: the message says it all
    assert not [p for p in (sweep / "0").iterdir() if p.name in RESULT_NAMES[:3]]
    assert_row_matches_metrics(table.loc[1], sweep / "1")
    assert pd.isna(table.loc[1, "error"])


def test_unreachable_wandb_still_completes(background):
    """W&B online at a closed port: a warning, the offline fallback, results, exit 0. The wait
    for the server is bounded by W&B's ``init_timeout`` (``WANDB_INIT_TIMEOUT``, 90 s unset)."""
    got = background["wandb"].result()
    run, out = got["run"], got["out"]
    assert run.rc == 0, explain(run)
    assert "falling back to offline" in run.stderr, explain(run)
    metrics = results.read_metrics(out)
    assert metrics is not None and metrics["intervention"] == "nullspace"
    assert metrics["n_calibration"] + metrics["n_evaluation"] == 4  # n_examples: evaluation only
    assert len(pd.read_csv(out / "layers.csv")) == SMOL_LAYERS
    offline = list((out / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((out / "wandb").iterdir())
    data = b"".join(p.read_bytes() for p in offline[0].glob("run-*.wandb"))
    assert b"nullspace/rho" in data and b"nullspace/norm" in data  # per-layer series
    assert b"direction/raw_norm" in data
    assert run.seconds < 400, explain(run)


def test_caches_are_written_under_the_cache_root(background):
    """Probe and null-space entries land in the cache root; the working directory gets only the
    run directory and the source tree gets nothing."""
    got = background["wandb"].result()
    assert got["run"].rc == 0, explain(got["run"])
    assert len(list((got["cache"] / "probe").glob("*.npz"))) >= 1
    assert len(list((got["cache"] / "nullspace").glob("*.safetensors"))) == 1
    assert [p.name for p in got["cwd"].iterdir()] == ["out"]
    assert not got["new_repo_files"], got["new_repo_files"]


def test_no_unsafe_deserialization_in_the_package():
    """No pickle / joblib / pandas pickles; every np.load passes allow_pickle=False and every
    torch.load weights_only=True (the tuned-lens library's params.pt: tensors only, read by
    torch's restricted unpickler)."""
    forbidden = {"pickle.load", "pickle.loads", "joblib.load", "pd.read_pickle",
                 "pandas.read_pickle", "dill.load", "dill.loads", "cloudpickle.load",
                 "cloudpickle.loads", "torch.serialization.load"}
    np_loads, torch_loads, problems = 0, 0, []
    for path in sorted((REPO / "calibrate").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(m.split(".")[0] in ("pickle", "dill", "cloudpickle") for m in mods):
                    problems.append(f"{path.name}:{node.lineno} imports a pickle module")
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            where = f"{path.name}:{node.lineno} {name}"
            if name in forbidden:
                problems.append(where)
            elif name == "torch.load":
                torch_loads += 1
                flag = [k for k in node.keywords if k.arg == "weights_only"]
                if not flag or not (isinstance(flag[0].value, ast.Constant)
                                    and flag[0].value.value is True):
                    problems.append(f"{where} without weights_only=True")
            elif name in ("np.load", "numpy.load"):
                np_loads += 1
                flag = [k for k in node.keywords if k.arg == "allow_pickle"]
                if not flag or not (isinstance(flag[0].value, ast.Constant)
                                    and flag[0].value.value is False):
                    problems.append(f"{where} without allow_pickle=False")
    assert not problems, problems
    assert np_loads >= 1  # the scan sees the probe cache's reader
    assert torch_loads >= 1  # ... and the tuned lens's params.pt reader


# ---------------------------------------------------------------- resume and SIGKILL

def test_resume_skips_complete_and_redoes_incomplete(tmp_path):
    cache = isolated_cache(tmp_path / "cache")
    sweep = tmp_path / "sweep"
    args = ["calibrate.run", "-m", "dataset.limit=2,3", *LEAN, f"hydra.sweep.dir={sweep}"]
    env = {"CALIBRATE_CACHE": str(cache)}
    first = cli(args, tmp_path / "cwd", env=env)
    assert first.rc == 0, explain(first)
    assert list(sweep_summary(sweep)["status"]) == ["complete", "complete"]
    kept = {name: (sweep / "0" / name).stat().st_mtime_ns for name in RESULT_NAMES[:3]}
    layers_1 = (sweep / "1" / "layers.csv").read_bytes()
    (sweep / "1" / "metrics.json").unlink()  # job 1 now looks incomplete
    assert results.read_metrics(sweep / "1") is None

    second = cli([*args, "resume=true"], tmp_path / "cwd", env=env)
    assert second.rc == 0, explain(second)
    assert f"resume: {sweep / '0'} holds this config's result" in second.stderr, explain(second)
    assert f"resume: {sweep / '1'}" not in second.stderr, explain(second)
    assert f"results in {sweep / '1'}" in second.stderr, explain(second)
    assert {n: (sweep / "0" / n).stat().st_mtime_ns for n in kept} == kept  # untouched
    assert results.read_metrics(sweep / "1")["n_examples"] == 3
    assert (sweep / "1" / "layers.csv").read_bytes() == layers_1
    table = sweep_summary(sweep)
    assert list(table["status"]) == ["complete", "complete"]
    for index in (0, 1):
        assert_row_matches_metrics(table.loc[index], sweep / str(index))


def _probe_started(out: Path, err: Path) -> bool:
    return b"probe smollm2" in err.read_bytes()


def _plot_started(out: Path, err: Path) -> bool:
    return any(p.suffix == ".png" or ".png." in p.name for p in out.glob("*"))


KILL_MOMENTS: dict[str, Callable[[Path, Path], bool]] = {
    "right after start": lambda out, err: True,
    "job dir has .hydra": lambda out, err: (out / ".hydra").is_dir(),
    "probe running": _probe_started,
    "first plot being written": _plot_started,
}


def test_sigkill_leaves_nothing_that_looks_complete_and_resume_finishes(tmp_path):
    """SIGKILL at several moments of one job, then ``resume=true`` into the same directory."""
    cache = isolated_cache(tmp_path / "cache")  # empty: the probe really runs
    out = tmp_path / "job"
    args = ["calibrate.run", f"dataset.limit={KILL_LIMIT}", "tracker=none", "metrics.bootstrap=0",
            f"hydra.run.dir={out}"]  # progress bar and plots on: both mark moments
    env = cli_env({**ONE_THREAD, "CALIBRATE_CACHE": str(cache)})
    report = []
    for moment, ready in KILL_MOMENTS.items():
        err_path = tmp_path / f"kill-{len(report)}.stderr"
        with err_path.open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", *args], cwd=tmp_path, env=env,
                                    stdout=subprocess.DEVNULL, stderr=err)
            start = time.perf_counter()
            try:
                while proc.poll() is None and not ready(out, err_path):
                    assert time.perf_counter() - start < 300, f"{moment}: not reached in 300 s"
                    time.sleep(0.02)
                if moment == "right after start":
                    time.sleep(0.2)
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.kill()
                proc.wait()
        stderr = err_path.read_text(errors="replace")
        assert proc.returncode == -signal.SIGKILL, f"{moment}: the job ended by itself\n{stderr}"
        assert results.read_metrics(out) is None, f"{moment}: a complete metrics.json"
        checked = check_no_truncated_files(out) if out.is_dir() else []
        temps = sorted(p.name for p in out.glob(".*.tmp")) if out.is_dir() else []
        report.append(f"{moment}: {time.perf_counter() - start:.1f}s, whole {checked}, "
                      f"temporary {temps}")
    resumed = cli([*args, "resume=true"], tmp_path / "cwd", env={"CALIBRATE_CACHE": str(cache)})
    print("\n".join(report))
    assert resumed.rc == 0, explain(resumed)
    assert "skipped" not in resumed.stderr, explain(resumed)
    metrics = results.read_metrics(out)
    assert metrics is not None and metrics["n_examples"] == KILL_LIMIT, "\n".join(report)
    names = check_no_truncated_files(out)
    for name in ("layers.csv", "predictions.npz", "metrics.json", "layer_curves.png",
                 "reliability_final.png"):
        assert name in names, names
    # the peak's diagram where metrics.json names a peak, and only there
    assert ("reliability_peak_ece.png" in names) == (metrics["peak_ece_layer"] is not None)
    assert len(pd.read_csv(out / "layers.csv")) == SMOL_LAYERS


# ---------------------------------------------------------------- in process, on the real model

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process jobs use one math thread too (see ONE_THREAD)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inproc_cache(tmp_path_factory) -> Path:
    return isolated_cache(tmp_path_factory.mktemp("inproc_cache"))


@pytest.fixture(scope="module")
def job_config(inproc_cache):
    """``job_config(limit, **values)``: the job spec of the lean defaults and these values."""
    from conftest import spec_of

    def make(limit: int, **values):
        base = dict(item.split("=", 1) for item in LEAN)
        base.update({"dataset.limit": str(limit), "cache_dir": str(inproc_cache)})
        base.update({k: str(v) for k, v in values.items()})
        return spec_of(*(f"{k}={v}" for k, v in base.items()))
    return make


@pytest.fixture
def uncached(monkeypatch):
    """Every probe really runs: no in-memory or on-disk probe cache."""
    probe_cache._MEMORY.clear()
    monkeypatch.setattr(probe_cache, "load", lambda key, cache_dir: None)
    monkeypatch.setattr(probe_cache, "store", lambda key, result, cache_dir: None)
    yield
    probe_cache._MEMORY.clear()


def test_same_config_and_seed_give_identical_files(job_config, uncached, tmp_path):
    cfg = job_config(6, **{"metrics.bootstrap": 50})  # the seeded bootstrap is part of it
    first = job_mod.run_job(cfg, tmp_path / "a")
    second = job_mod.run_job(cfg, tmp_path / "b")
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    assert (a_dir / "layers.csv").read_bytes() == (b_dir / "layers.csv").read_bytes()
    with np.load(a_dir / "predictions.npz") as a, np.load(b_dir / "predictions.npz") as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    first.pop("elapsed_s")
    second.pop("elapsed_s")
    assert first == second


def test_out_of_memory_halving_in_a_job(job_config, uncached, tmp_path, monkeypatch, capsys):
    """Batches of more than 2 prompts run out of memory: the job halves its batch and ends with
    the metrics of a job without the fault."""
    cfg = job_config(6, **{"probe.batch_size": 6})
    clean = job_mod.run_job(cfg, tmp_path / "clean")
    real, sizes = probe_mod.forward_batch, []

    def flaky(loaded, lens, ids, *rest):
        sizes.append(int(ids.shape[0]))
        if ids.shape[0] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(loaded, lens, ids, *rest)

    monkeypatch.setattr(probe_mod, "forward_batch", flaky)
    faulty = job_mod.run_job(cfg, tmp_path / "faulty")
    assert sizes[0] == 6, sizes
    assert sum(s for s in sizes if s <= 2) == 6, sizes  # every example once, in small batches
    assert "out of memory with 6 prompts per batch; retrying with 3" in capsys.readouterr().out
    assert faulty["n_examples"] == clean["n_examples"] == 6
    # batches of 2 and of 6 round differently (~1e-7 in a probability); smooth ECE's kernel
    # bandwidth search turns that into ~1e-6, so it alone is compared at 1e-5
    loose = {"smece": 1e-5}
    for key, value in clean["final"].items():
        assert faulty["final"][key] == pytest.approx(value, rel=1e-5,
                                                     abs=loose.get(key, 1e-6)), key
    a, b = (pd.read_csv(tmp_path / d / "layers.csv") for d in ("clean", "faulty"))
    pd.testing.assert_frame_equal(a.drop(columns=list(loose)), b.drop(columns=list(loose)),
                                  rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["smece"], b["smece"], rtol=0, atol=loose["smece"])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_probe_cache_entry_is_rebuilt(job_config, tmp_path, monkeypatch, damage):
    cfg = job_config(5)
    keys, computed = [], []
    from calibrate.engine.scoring import SingleToken

    real_load, real_probe = probe_cache.load, SingleToken.score
    monkeypatch.setattr(probe_cache, "load", lambda key, cache_dir: keys.append(key) or
                        real_load(key, cache_dir))
    monkeypatch.setattr(SingleToken, "score",
                        lambda *a, **k: computed.append(1) or real_probe(*a, **k))
    probe_cache._MEMORY.clear()
    first = job_mod.run_job(cfg, tmp_path / "first")
    entry = probe_cache._path(keys[-1], cfg.cache_dir)
    assert entry.is_file() and entry.parent == Path(cfg.cache_dir) / "probe"
    whole = entry.read_bytes()
    entry.write_bytes(whole[: len(whole) // 2] if damage == "truncated" else b"not a zip" * 500)
    probe_cache._MEMORY.clear()
    computed.clear()
    second = job_mod.run_job(cfg, tmp_path / "second")
    assert computed == [1], "the damaged entry was used"
    layers = [(tmp_path / d / "layers.csv").read_bytes() for d in ("first", "second")]
    assert layers[0] == layers[1]
    assert first["final"] == second["final"]
    with np.load(entry, allow_pickle=False) as data:  # rewritten whole
        assert "option_logits" in data.files
    probe_cache._MEMORY.clear()
    reloaded = real_load(keys[-1], cfg.cache_dir)
    assert reloaded is not None and reloaded.option_logits.shape == (5, SMOL_LAYERS, 2)
    probe_cache._MEMORY.clear()


def test_non_finite_activations_are_recorded_in_a_sweep(inproc_cache, tmp_path, monkeypatch, caplog,
                                                        uncached):
    """A block that outputs inf (as an fp16 overflow would): the job's ``error.json`` names the
    layer and the sweep summary shows the job as failed. The real ``calibrate.run.main`` runs,
    in process, with Hydra's config of job 0 of a multirun."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from calibrate import run as run_mod

    sweep = tmp_path / "sweep"
    job_dir = sweep / "0"
    overrides = ["dataset.limit=4", *LEAN, f"cache_dir={inproc_cache}"]
    with initialize_config_dir(config_dir=str(run_mod.CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(sweep)
        cfg.hydra.runtime.output_dir = str(job_dir)
    task = cfg.copy()
    with open_dict(task):
        del task["hydra"]
    job_dir.mkdir(parents=True)
    (job_dir / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(overrides), job_dir / ".hydra" / "overrides.yaml")

    def to_inf(_module, _args, output):
        return replace_block_hidden(output, block_hidden(output) * float("inf"))

    real_load, handles = job_mod.load_model, []

    def load_with_fault(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        handles.append(loaded.adapter.blocks[4].register_forward_hook(to_inf))  # layer 5
        return loaded

    monkeypatch.setattr(job_mod, "load_model", load_with_fault)
    HydraConfig.instance().set_config(cfg)
    try:
        returned = run_mod.main.__wrapped__(task)
    finally:
        HydraConfig.instance().cfg = None
        for handle in handles:
            handle.remove()
    assert returned is None and handles
    assert "error: non-finite residual at layer 5" in caplog.text  # the job's log (and run.log)
    error = json.loads((job_dir / "error.json").read_text())
    assert error["error_type"] == "NonFiniteActivations"
    assert error["error"].startswith("non-finite residual at layer 5 (of 31)")
    assert "NonFiniteActivations" in error["traceback"]
    assert not [p for p in job_dir.iterdir() if p.name in RESULT_NAMES[:3] or p.suffix == ".png"]
    table = summarize_sweep(sweep)
    assert list(table["status"]) == ["failed"]
    assert table.loc[0, "error"].startswith("NonFiniteActivations: non-finite residual at layer 5")
    assert (sweep / "summary.csv").is_file()


# ---------------------------------------------------------------- identity of a job folder

def test_resume_compares_the_config_not_the_existence_of_a_result(tmp_path):
    """resume=true reuses a folder's result only for the same config; another config reruns
    (naming the keys), and without resume it is refused; a skip leaves ``.hydra/`` alone."""
    cache = isolated_cache(tmp_path / "cache")
    out = tmp_path / "job"
    env = {"CALIBRATE_CACHE": str(cache)}
    args = ["calibrate.run", *LEAN, f"hydra.run.dir={out}"]
    first = cli([*args, "dataset.limit=2"], tmp_path / "cwd", env=env)
    assert first.rc == 0, explain(first)
    hydra_files = {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()}

    same = cli([*args, "dataset.limit=2", "resume=true"], tmp_path / "cwd", env=env)
    assert same.rc == 0 and "holds this config's result" in same.stderr, explain(same)
    assert {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()} == hydra_files

    refused = cli([*args, "dataset.limit=3"], tmp_path / "cwd", env=env)
    assert refused.rc == 2, explain(refused)
    assert len(refused.lines()) == 1, explain(refused)
    assert "already holds the result of another config (differs in dataset.limit: 2 -> 3)" \
        in refused.lines()[0], explain(refused)
    assert results.read_metrics(out)["n_examples"] == 2
    assert not (out / "error.json").exists()
    assert {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()} == hydra_files

    changed = cli([*args, "dataset.limit=3", "resume=true"], tmp_path / "cwd", env=env)
    assert changed.rc == 0, explain(changed)
    assert "dataset.limit: 2 -> 3" in changed.stderr and "rerunning" in changed.stderr
    assert results.read_metrics(out)["n_examples"] == 3
    assert "dataset.limit=3" in (out / ".hydra" / "overrides.yaml").read_text()


STALE = {  # files a steering job of another config left, and its exports and failure record
    "steering.csv": "eta,layer,ece\n4,30,0.1\n", "null.csv": "eta,p_value_ece\n4,0.5\n",
    "direction.json": '{"method": "layer_diff"}', "direction.safetensors": "x",
    "baselines.csv": "layer\n30\n", "eta_curves.png": "x", "gradient_fit.csv": "step\n0\n",
    "predictions.npz": "x", "reliability_peak_ece.png": "x", "error.json": "{}",
    "direction.gguf": "x", "lmeval_steer_eta4.pt": "x",
    results.LOCK_FILE: "999999999 nowhere 2024-01-01\n",  # a killed job's lock: taken over
}


def test_a_rerun_leaves_no_file_of_the_config_it_replaces(tmp_path):
    """resume=true over another config's steering result: a probe-only rerun that writes fewer
    files removes every result file first; metrics.json lists exactly the files there are."""
    out = tmp_path / "job"
    out.mkdir()
    for name, text in STALE.items():
        (out / name).write_text(text)
    (out / "metrics.json").write_text(json.dumps({"status": "complete", "config_hash": "other",
                                                  "study": "steering"}))
    run = cli(["calibrate.run", "dataset.limit=4", *LEAN, "output.predictions=false",
               "resume=true", f"hydra.run.dir={out}"], tmp_path / "cwd",
              env={"CALIBRATE_CACHE": str(isolated_cache(tmp_path / "cache"))})
    assert run.rc == 0, explain(run)
    metrics = results.read_metrics(out)
    assert metrics["study"] == "probe" and metrics["n_examples"] == 4
    there = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "run.log")
    assert there == metrics["files"] == ["layers.csv", "metrics.json"], there
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [".hydra"]


def test_a_folder_another_job_holds_is_refused(tmp_path):
    """One job owns a folder at a time: a job started into a folder whose lock another job
    holds ends in one line naming the folder, exit 2, before anything is read or written."""
    out = tmp_path / "job"
    out.mkdir()
    (out / "layers.csv").write_text("layer,ece\n0,0.5\n")  # the holder's work in progress
    with results.JobLock(out).acquire():
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "run.log"}
        run = cli(["calibrate.run", "dataset.limit=2", *LEAN, f"hydra.run.dir={out}"],
                  tmp_path / "cwd", env={"CALIBRATE_CACHE": str(tmp_path / "cache")})
        after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "run.log"}
    assert run.rc == 2, explain(run)
    assert len(run.lines()) == 1 and "Traceback" not in run.stderr, explain(run)
    assert f"{out} is in use by another job (pid {os.getpid()} on " in run.lines()[0]
    assert after == before  # nothing written (Hydra's run.log aside)
    assert not (tmp_path / "cache").exists() and WEIGHTS_MARKER not in run.stderr


def _other_configs_sweep(sweep: Path, jobs: tuple[str, ...]) -> dict[str, bytes]:
    """Fill ``sweep/<job>`` with another config's complete steering results (and an old
    summary.csv saying so); returns every file's bytes."""
    for job in jobs:
        folder = sweep / job
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text("- dataset.limit=99\n")
        (folder / "metrics.json").write_text(json.dumps({
            "status": "complete", "config_hash": f"other{job}", "study": "steering",
            "model": "smollm2", "n_examples": 99, "final": {"accuracy": 0.5, "ece": 0.1},
            "etas": [0.0, 4.0], "steering": {"4": {"accuracy": 0.5, "ece": 0.05}}}))
        (folder / "steering.csv").write_text("eta,layer,accuracy,ece\n0,30,0.5,0.1\n4,30,0.5,0.05\n")
    summarize_sweep(sweep)
    return {str(p.relative_to(sweep)): p.read_bytes() for p in sweep.rglob("*") if p.is_file()}


def test_a_sweep_that_refuses_every_job_says_so_and_exits_2(tmp_path):
    """Both jobs of a multirun meet another config's result: both are refused (nothing written
    into their folders), summary.csv and the tally say refused, not the old complete."""
    sweep = tmp_path / "sweep"
    before = _other_configs_sweep(sweep, ("0", "1"))
    run = cli(["calibrate.run", "-m", "dataset.limit=2,3", *LEAN, f"hydra.sweep.dir={sweep}"],
              tmp_path / "cwd", env={"CALIBRATE_CACHE": str(tmp_path / "cache")})
    assert run.rc == 2, explain(run)
    assert run.lines()[-1].startswith("[calibrate] sweep: 2 jobs: 2 refused; summary "), \
        explain(run)
    table = sweep_summary(sweep)
    assert list(table["status"]) == ["refused", "refused"]
    assert [o.split()[0] for o in table["overrides"]] == ["dataset.limit=2", "dataset.limit=3"]
    assert table["error"].str.startswith("FolderInUse: ").all()
    assert table["error"].str.contains("already holds the result of another config").all()
    assert not (sweep / "steering_summary.csv").exists()  # the old rows are not this sweep's
    after = {str(p.relative_to(sweep)): p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    hydra_own = {"multirun.yaml", "0/run.log", "1/run.log"}
    assert changed <= {"summary.csv", "steering_summary.csv", *hydra_own}, changed
    assert WEIGHTS_MARKER not in run.stderr


def test_a_sweep_with_a_refused_job_exits_2_and_keeps_the_others(tmp_path):
    """Job 0 meets another config's result and is refused; job 1 runs on the real model. The
    summary shows what this invocation did: 1 complete, 1 refused; exit status 2."""
    cache = isolated_cache(tmp_path / "cache")
    sweep = tmp_path / "sweep"
    before = _other_configs_sweep(sweep, ("0",))
    run = cli(["calibrate.run", "-m", "dataset.limit=4,3", *LEAN, f"hydra.sweep.dir={sweep}"],
              tmp_path / "cwd", env={"CALIBRATE_CACHE": str(cache)})
    assert run.rc == 2, explain(run)
    assert "sweep: 2 jobs: 1 complete, 1 refused" in run.lines()[-1], explain(run)
    table = sweep_summary(sweep)
    assert list(table["status"]) == ["refused", "complete"]
    assert table.loc[0, "overrides"].split()[0] == "dataset.limit=4"
    assert table.loc[0, "error"].startswith("FolderInUse: ")
    assert_row_matches_metrics(table.loc[1], sweep / "1")
    assert results.read_metrics(sweep / "1")["n_examples"] == 3
    for name in ("0/metrics.json", "0/steering.csv", "0/.hydra/overrides.yaml"):
        assert (sweep / name).read_bytes() == before[name], name
    assert not (sweep / "0" / "error.json").exists()
    assert not (sweep / summary_mod.REFUSED_DIR).exists()  # the notes are gone


def test_two_sweeps_started_together_get_their_own_folders(tmp_path):
    """Started in the same second from the same folder, with the default sweep folder."""
    cache = isolated_cache(tmp_path / "cache")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = cli_env({**ONE_THREAD, "CALIBRATE_CACHE": str(cache)})
    cmd = [sys.executable, "-m", "calibrate.run", "-m", "dataset.limit=2", *LEAN]
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for _ in range(2)]
    errs = [p.communicate(timeout=600)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    sweeps = sorted(p.parent for p in cwd.glob("multirun/*/*/summary.csv"))
    assert len(sweeps) == 2, (sweeps, errs)
    for sweep in sweeps:
        table = sweep_summary(sweep)
        assert list(table["status"]) == ["complete"]
        assert_row_matches_metrics(table.loc[0], sweep / "0")


def test_a_sweep_whose_jobs_all_fail_exits_non_zero(tmp_path):
    bad = []
    for name in ("bad_a", "bad_b"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
        bad.append(str(folder))
    sweep = tmp_path / "sweep"
    run = cli(["calibrate.run", "-m", f"model.path={','.join(bad)}", "dataset.limit=2", *LEAN,
               f"hydra.sweep.dir={sweep}"], tmp_path / "cwd")
    assert run.rc == 1, explain(run)
    assert "sweep: 2 jobs: 2 failed" in run.lines()[-1], explain(run)
    assert list(sweep_summary(sweep)["status"]) == ["failed", "failed"]
