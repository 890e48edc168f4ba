"""The ``calibrate`` command (``python -m calibrate <command> ...``, :mod:`calibrate.cli`).

Every subcommand, in a subprocess: exit status 0 after a successful tiny run, and 2 on bad input
with exactly one line on stderr (``error: ...`` naming the value and what is accepted) and
nothing written. ``calibrate bench`` exits 0 (it used to pass its dict of figures to
``sys.exit``, which exits 1). The runs start in the background when the module starts, two at
a time (each spends most of its time importing torch); probe cache entries go to a throw-away
cache root whose models, wheels and unpacked data are links to the real cache.
"""

from __future__ import annotations

import concurrent.futures
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from cli_support import ONE_THREAD, Run, cli_env, explain, isolated_cache, run_process

from calibrate import cli as calibrate_cli

LEAN = ("tracker=none", "probe.progress=false", "output.plots=false", "metrics.bootstrap=0")


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # after ``python -m calibrate``; "{tmp}" is the case's folder
    rc: int
    names: tuple[str, ...] = ()  # bad input: what the one stderr line must name
    accepts: tuple[str, ...] = ()  # bad input: what it must offer instead
    prepare: Callable[[Path], None] | None = field(default=None, hash=False, compare=False)


def _sweep(tmp: Path) -> None:
    from calibrate.io.report.synthetic import write_sweep

    write_sweep(tmp / "sweep", 2)


def _steering_job(tmp: Path) -> None:
    """A steering job's files, as ``calibrate export`` reads them (position=all, 2 layers)."""
    from calibrate.core.direction import Direction
    from calibrate.directions.files import save_direction

    vec = np.random.default_rng(0).standard_normal(8)
    meta = {"intervention_layers": [2, 3], "position": "all", "eta_scale": "absolute",
            "layer_scale": None, "config_hash": "0123456789abcdef"}
    job = tmp / "job"
    save_direction(Direction(vec / np.linalg.norm(vec), meta), job)
    (job / "metrics.json").write_text(json.dumps({
        "status": "complete", "study": "steering", "model_type": "gpt2",
        "config_hash": "0123456789abcdef", "etas": [0.0, 2.0], "intervention_layers": [2, 3]}))


GOOD = [
    Case("run", ("run", "dataset.limit=2", *LEAN, "hydra.run.dir={tmp}/out"), 0),
    Case("report", ("report", "{tmp}/sweep", "--out", "{tmp}/report", "--metric", "ece",
                    "--dpi", "30"), 0, prepare=_sweep),
    Case("compare", ("compare", "{tmp}/sweep", "--out", "{tmp}/compare", "--metric", "ece"), 0,
         prepare=_sweep),
    Case("export_lmeval", ("export", "lmeval", "{tmp}/job", "--eta", "2", "--out",
                           "{tmp}/steer.pt"), 0, prepare=_steering_job),
    Case("export_repeng", ("export", "repeng", "{tmp}/job", "--out", "{tmp}/cv.gguf"), 0,
         prepare=_steering_job),
    Case("bench", ("bench", "--dataset", "sst2", "--n", "2", "--rounds", "1", "--only", "probe",
                   "--threads", "1", "--output", "{tmp}/bench.json"), 0),
    Case("bench_nullspace", ("bench", "nullspace", "--hidden", "16", "--vocab", "64",
                             "--repeats", "1", "--output", "{tmp}/bench.json"), 0),
    Case("assets", ("assets", "prepare", "smollm2"), 0),
]
BAD = [
    Case("run_bad", ("run", "dataset.limit=0", *LEAN, "hydra.run.dir={tmp}/out"), 2,
         ("limit 0",), ("integer >= 1",)),
    Case("run_unknown_key", ("run", "+probe.nope=1", *LEAN, "hydra.run.dir={tmp}/out"), 2,
         ("probe.nope is not a config key",), ("batch_size",)),
    Case("report_bad", ("report", "{tmp}/nothing", "--out", "{tmp}/report"), 2,
         ("{tmp}/nothing", "no such directory"), ("sweep directory",)),
    Case("compare_bad", ("compare", "{tmp}/nothing", "--out", "{tmp}/compare"), 2,
         ("{tmp}/nothing", "no such directory"), ("sweep directory",)),
    Case("export_bad", ("export", "lmeval", "{tmp}/nothing", "--eta", "2"), 2,
         ("{tmp}/nothing", "holds no finished result"), ("the folder of a finished steering job",)),
    Case("bench_bad", ("bench", "--dataset", "nosuch", "--n", "2", "--rounds", "1",
                       "--output", "{tmp}/bench.json"), 2,
         ("unknown dataset 'nosuch'",), ("sst2", "mmlu")),
    Case("assets_bad", ("assets", "prepare", "nosuchmodel"), 2, ("'nosuchmodel'",),
         ("'data'", "smollm2")),
]
COMMANDS = {c.argv[0] for c in GOOD}
assert COMMANDS == set(calibrate_cli.COMMANDS) == {c.argv[0] for c in BAD}  # every subcommand


def _run(case: Case, tmp: Path, cache: Path) -> tuple[Run, set[Path]]:
    if case.prepare is not None:
        case.prepare(tmp)
    before = {p for p in tmp.rglob("*") if p.is_file()}
    argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
    env = cli_env({**ONE_THREAD, "CALIBRATE_CACHE": str(cache)})
    cwd = tmp / "cwd"
    run = run_process([sys.executable, "-m", "calibrate", *argv], cwd, env,
                      tmp / ".stdout", tmp / ".stderr", timeout=600)
    return run, before


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
    """Start the runs this module's selected tests need, two at a time, at module start."""
    cache = isolated_cache(tmp_path_factory.mktemp("cache"))
    tmp_path_factory.getbasetemp()
    wanted = set()
    for item in request.session.items:
        if Path(item.path) == Path(__file__) and hasattr(item, "callspec"):
            case = item.callspec.params.get("case")
            if case is not None:
                wanted.add(case.id)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="cli")
    futures = {case.id: pool.submit(_run, case, tmp_path_factory.mktemp(case.id), cache)
               for case in [*GOOD, *BAD] if case.id in wanted}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("case", GOOD, ids=[c.id for c in GOOD])
def test_a_successful_run_exits_0(case, background):
    run, _ = background[case.id].result()
    tmp = run.cwd.parent
    assert run.rc == 0, explain(run, 2000)
    assert "Traceback" not in run.stderr, explain(run)
    if case.id == "run":
        metrics = json.loads((tmp / "out" / "metrics.json").read_text())
        assert metrics["status"] == "complete" and metrics["n_examples"] == 2
        assert metrics["study"] == "probe"
    elif case.id == "report":
        assert (tmp / "report" / "report.html").is_file()
        assert (tmp / "report" / "report.md").is_file()
    elif case.id == "compare":
        assert (tmp / "compare" / "runs.csv").is_file()
        assert (tmp / "compare" / "layers_ece.png").is_file()
    elif case.id == "export_lmeval":
        assert run.stdout.strip() == str(tmp / "steer.pt") and (tmp / "steer.pt").is_file()
    elif case.id == "export_repeng":
        from calibrate.directions.files import read_direction
        from calibrate.directions.gguf import read_control_vector

        assert run.stdout.strip() == str(tmp / "cv.gguf")
        control = read_control_vector(tmp / "cv.gguf")
        assert control.model_hint == "gpt2" and sorted(control.directions) == [2, 3]
        vector = read_direction(tmp / "job" / "direction.safetensors").vector
        np.testing.assert_allclose(control.directions[3], vector, atol=1e-6)  # float32 in GGUF
    elif case.id == "bench":
        figures = json.loads((tmp / "bench.json").read_text())
        assert figures["probe_s"] > 0
        assert '"probe_s"' in run.stdout  # the figures are printed, not passed to sys.exit
    elif case.id == "bench_nullspace":
        figures = json.loads((tmp / "bench.json").read_text())
        assert figures["nullspace_gram_s"] > 0 and figures["nullspace_bench"]["k"] >= 1
    elif case.id == "assets":
        assert Path(run.stdout.strip().splitlines()[-1]).is_dir()


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_input_exits_2_with_one_line(case, background):
    run, before = background[case.id].result()
    tmp = run.cwd.parent
    lines = run.lines()
    assert run.rc == 2, explain(run, 2000)
    assert "Traceback" not in run.stderr, explain(run)
    assert len(lines) == 1 and lines[0].startswith("error: "), explain(run)
    for text in (*case.names, *case.accepts):
        assert text.replace("{tmp}", str(tmp)) in lines[0], explain(run)
    written = {p for p in tmp.rglob("*") if p.is_file()} - before
    written = {p for p in written if p.parent != tmp or not p.name.startswith(".std")}
    written = {p for p in written if ".hydra" not in p.parts and p.name != "run.log"}
    assert not written, written


def test_no_command_and_an_unknown_one(capsys):
    """In process: usage on stderr; no command or an unknown one is exit status 2, the last line
    naming the command and the accepted ones; ``--help`` is 0."""
    assert calibrate_cli.main([]) == 2
    assert "calibrate report DIR" in capsys.readouterr().err
    assert calibrate_cli.main(["--help"]) == 0
    assert calibrate_cli.main(["nope"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == ("error: unknown command 'nope'; accepted: run, report, compare, export, "
                    "bench, assets")
