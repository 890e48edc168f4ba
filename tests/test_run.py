"""The CLI (``python -m calibrate.run``) end to end, in subprocesses, and the notebook API.

* Bad input: a non-zero exit, one clear line on stderr naming the bad value (and what is
  accepted), no result files, and no model weights read. Every case runs in-process through
  the job's own preparation (with weight loading replaced by a failure); the cases marked
  ``cli`` also run through the real CLI, where Hydra's own errors (unknown group option or key)
  are folded into the same one line by the preflight.
* One multirun, ``dataset.limit=6,0,8``: the preflight refuses the whole sweep in one line
  before any job starts (the bad value is known before anything runs).
* The default job on the real SmolLM2 with the W&B tracker offline, checked against the model.
* rotten_tomatoes and TruthfulQA from ``../shared/data`` (skipped where it is absent).
* The README's Python API.

All subprocesses start in the background when the module starts, two at a time (see
:func:`background`); the whole module takes about 3 minutes of CPU.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_support import Run, cli_env, explain, run_process
from conftest import spec_of
from omegaconf import OmegaConf

import calibrate
from calibrate import job as job_mod
from calibrate.api import dataset_config
from calibrate.config.spec import build_spec
from calibrate.core.metrics import ece, mce
from calibrate.errors import USER_ERRORS, one_line

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RESULT_NAMES = ("layers.csv", "metrics.json", "predictions.npz", "predictions.parquet",
                "samples_lmeval.jsonl")
PLOTS = ("layer_curves.png", "reliability_final.png", "reliability_peak_ece.png", "risk_coverage.png")
QUICK_S = 60  # CPU seconds: a config error ends long before a model is loaded and probed
WEIGHTS_MARKER = "Loading weights"  # transformers' progress line while reading weights
SMOL_LAYERS = 31  # SmolLM2-135M: embeddings + 30 blocks


# ---------------------------------------------------------------- running the CLI

def cli(args: list[str], root: Path, *, multirun: bool = False, timeout: float = 600) -> Run:
    """Run the CLI with ``root`` as cwd and output folder; offline, no HYDRA_FULL_ERROR."""
    where = f"hydra.sweep.dir={root / 'sweep'}" if multirun else f"hydra.run.dir={root / 'out'}"
    cmd = [sys.executable, "-m", "calibrate.run", *(["-m"] if multirun else []), *args, where]
    out_path, err_path = root / ".cli.stdout", root / ".cli.stderr"
    run = run_process(cmd, root, cli_env(), out_path, err_path, timeout)
    out_path.unlink()
    err_path.unlink()
    return run


def result_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.name in RESULT_NAMES or p.suffix == ".png")



# ---------------------------------------------------------------- bad input

@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # "{tmp}" is the case's folder, "{eta}" is eta or +eta
    names: tuple[str, ...]  # what the error line must name (the bad value)
    accepts: tuple[str, ...] = ()  # what it must offer instead
    hydra: bool = False  # Hydra's own composition error (folded into one line by the preflight)
    cli: bool = False  # also run through the real CLI
    files: dict = field(default_factory=dict, hash=False, compare=False)  # name -> text, in {tmp}


BERT_CONFIG = json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"],
                          "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "intermediate_size": 64})

CASES = [
    Case("model_unknown", ("model=nope",), ("model/nope",), ("smollm2", "phi2"), hydra=True, cli=True),
    Case("dataset_unknown", ("dataset=nope",), ("dataset/nope",), ("sst2", "mmlu"), hydra=True),
    Case("key_unknown", ("foo=1",), ("'foo'",), hydra=True, cli=True),
    Case("tracker_unknown", ("tracker=nope",), ("tracker/nope",), ("wandb", "none"), hydra=True, cli=True),
    Case("eta_abc", ("{eta}=abc",), ("eta='abc'",), ("finite numbers",), cli=True),
    Case("eta_nan", ("{eta}=nan",), ("eta=nan",), ("finite numbers",)),
    Case("eta_inf", ("{eta}=inf",), ("eta=inf",), ("finite numbers",)),
    Case("limit_zero", ("dataset.limit=0",), ("limit 0",), ("integer >= 1",), cli=True),
    Case("limit_negative", ("dataset.limit=-3",), ("limit -3",), ("integer >= 1",)),
    Case("jsonl_empty", ("dataset.local_path={tmp}/empty.jsonl",), ("{tmp}/empty.jsonl", "no rows"),
         files={"empty.jsonl": ""}, cli=True),
    Case("jsonl_malformed", ("dataset.local_path={tmp}/bad.jsonl",),
         ("{tmp}/bad.jsonl", "line 2", "not valid JSON"),
         files={"bad.jsonl": '{"sentence": "fine", "label": 1}\n{"sentence": "oops", label: 0\n'},
         cli=True),
    Case("file_missing", ("dataset.local_path={tmp}/missing.jsonl",),
         ("{tmp}/missing.jsonl", "does not exist"), cli=True),
    Case("verbalizer_multitoken", ('dataset.verbalizer=[" antidisestablishmentarianism"," positive"]',),
         ("' antidisestablishmentarianism'", "not a single token"), ("one token each",), cli=True),
    Case("answer_format", ("dataset.answer_format=bogus",), ("'bogus'",), ("letters, verbalizer, cloze",)),
    Case("cloze_norm", ("dataset=arc_easy", "dataset.cloze_norm=chars"), ("cloze_norm 'chars'",),
         ("none, token, char, byte",), cli=True),
    Case("no_template", ("dataset=arc_easy", "dataset.answer_format=verbalizer",
                         'dataset.verbalizer=[" A"," B"]'),
         ("answer_format 'verbalizer'",), ("['cloze', 'letters']", "set dataset.template")),
    Case("dtype", ("model.dtype=float8",), ("model.dtype='float8'",), ("float32", "bfloat16"), cli=True),
    Case("device", ("model.device=tpu",), ("model.device='tpu'",), ("cpu", "cuda")),
    Case("n_bins", ("metrics.n_bins=0",), ("metrics.n_bins=0",), ("integer >= 1",)),
    Case("binning", ("metrics.binning=nope",), ("metrics.binning='nope'",), ("guo", "torchmetrics")),
    Case("batch_size", ("probe.batch_size=0",), ("probe.batch_size=0",), ("integer >= 1", "auto")),
    Case("option_mass", ("probe.option_mass=some",), ("probe.option_mass='some'",),
         ("final", "all", "none")),
    Case("architecture", ("model.path={tmp}/bert",), ("'bert'", "no adapter"), ("llama", "gpt2"),
         files={"bert/config.json": BERT_CONFIG}, cli=True),
    Case("mmlu_subject", ("dataset=mmlu", "dataset.subjects=[astrology]"), ("'astrology'",),
         ("abstract_algebra",), cli=True),
    Case("mmlu_category", ("dataset=mmlu", "dataset.category=arts"), ("'arts'",),
         ("stem", "humanities")),
    Case("experiment_unknown", ("experiment=nosuch",), ("experiment='nosuch'",),
         ("debug", "eta_sweep"), hydra=True, cli=True),
    # a value of the wrong type is refused by Hydra against the typed schema while composing
    Case("seed_abc", ("seed=abc",), ("seed=abc",), ("converted to Integer",), hydra=True,
         cli=True),
    Case("flag_maybe", ("probe.progress=maybe",), ("probe.progress=maybe",),
         ("not a valid bool",), hydra=True),
    Case("key_unknown_added", ("+probe.nope=1",), ("probe.nope is not a config key",),
         ("batch_size", "progress"), cli=True),
    Case("intervention_layers", ("intervention=steering", "intervention.layers=[99]"),
         ("intervention.layers=[99]", "[99] outside this model's 0..30"), ("0..30",), cli=True),
    Case("direction_layers", ("intervention=steering", "direction.layers=[31]"),
         ("direction.layers=[31]",), ("1..30",)),
    Case("nullspace_k", ("intervention=nullspace", "nullspace.k=1000"), ("nullspace.k=1000",),
         ("0..576",), cli=True),
    Case("no_cuda", ("model.device=cuda",), ("model.device='cuda'",), ("cpu",), cli=True),
]
CLI_CASES = [c for c in CASES if c.cli]
assert len(CLI_CASES) >= 12


def eta_key() -> str:
    """``eta`` when the composed config has it, else ``+eta`` (check_job reads a top-level eta)."""
    return "eta" if "eta" in calibrate.compose([]) else "+eta"


def materialize(case: Case, tmp: Path, eta: str) -> tuple[list[str], list[str]]:
    """The case's files written under ``tmp``; its overrides and expected names filled in."""
    for name, text in case.files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    fill = lambda s: s.replace("{tmp}", str(tmp)).replace("{eta}", eta)  # noqa: E731
    limit = [] if any(a.startswith("dataset.limit=") for a in case.args) else ["dataset.limit=4"]
    return limit + [fill(a) for a in case.args], [fill(n) for n in case.names]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_in_process(case, tmp_path, monkeypatch):
    """The job's own preparation raises a user error naming the value, before reading weights."""
    args, names = materialize(case, tmp_path, eta_key())

    def no_weights(*_a, **_k):
        raise AssertionError("model weights would be loaded")

    monkeypatch.setattr(job_mod, "load_model", no_weights)
    if case.hydra:
        from calibrate.preflight import PREFLIGHT_ERRORS, preflight

        with pytest.raises(PREFLIGHT_ERRORS) as info:
            preflight(args)
        message = one_line(info.value)
    else:
        cfg = calibrate.compose(args)
        with pytest.raises(USER_ERRORS) as info:
            job_mod.prepare(build_spec(cfg))
        message = str(info.value)
        assert "\n" not in message, f"multi-line message: {message!r}"
    for text in (*names, *case.accepts):
        assert text in message, f"{text!r} not in {message!r}"


# ---------------------------------------------------------------- subprocesses in the background

SHARED_CASES = {  # dataset -> (file under ../shared, the answer format its config uses)
    "rotten_tomatoes": ("data/rotten_tomatoes", "verbalizer"),
    "truthfulqa": ("data/truthfulqa/TruthfulQA.csv", "letters"),
}
SWEEP_ARGS = ["dataset.limit=6,0,8", "tracker=none", "probe.progress=false", "output.plots=false"]
E2E_ARGS = ["dataset.limit=24", "tracker=wandb"]


def _wanted(session, module_file: str) -> list[str]:
    """Background keys the selected tests of this module need, slowest first."""
    keys: list[str] = []
    for item in session.items:
        if Path(item.path) != Path(module_file):
            continue
        name = getattr(item, "originalname", item.name)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if name.startswith("test_e2e_"):
            keys.append("e2e")
        elif name == "test_multirun_with_an_invalid_value_fails_before_any_job":
            keys.append("sweep")
        elif name == "test_shared_dataset_through_cli" and (SHARED / "data").is_dir():
            keys.append(params["name"])
        elif name == "test_bad_input_cli":
            keys.append(params["case"].id)
    order = ["e2e", "sweep", *SHARED_CASES, *(c.id for c in CLI_CASES)]
    return sorted(set(keys), key=order.index)


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
    """Start every CLI run this module's selected tests need, two at a time, at module start.

    Each subprocess spends most of its time importing torch and transformers on one core, so
    two of them (plus the in-process tests in the main thread) keep a 2-core machine busy.
    Tests wait on their own run with ``background[key].result()``.
    """
    eta = eta_key()
    tmp_path_factory.getbasetemp()  # created here: two threads creating it at once can collide

    def bad(case: Case):
        tmp = tmp_path_factory.mktemp(case.id)
        args, names = materialize(case, tmp, eta)
        return cli(args, tmp, timeout=300), names

    def shared(name: str) -> Run:
        rel, _ = SHARED_CASES[name]
        args = [f"dataset={name}", f"dataset.local_path={SHARED / rel}", "dataset.limit=6",
                "tracker=none", "probe.progress=false", "output.plots=false"]
        return cli(args, tmp_path_factory.mktemp(name))

    jobs = {"e2e": lambda: cli(E2E_ARGS, tmp_path_factory.mktemp("e2e")),
            "sweep": lambda: cli(SWEEP_ARGS, tmp_path_factory.mktemp("sweep"), multirun=True),
            **{name: (lambda n=name: shared(n)) for name in SHARED_CASES},
            **{case.id: (lambda c=case: bad(c)) for case in CLI_CASES}}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="cli")
    futures = {key: pool.submit(jobs[key]) for key in _wanted(request.session, __file__)}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- the Python API (main thread)

@pytest.fixture(scope="module")
def lm():
    return calibrate.load_model("smollm2")


def test_python_api(lm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = calibrate.load_dataset("sst2", limit=10)
    assert len(records) == 10
    report = calibrate.probe_layers(lm, records, dataset="sst2")
    assert len(report.table) == SMOL_LAYERS
    assert list(report.table["layer"]) == list(range(SMOL_LAYERS))
    assert report.result.probs.shape == (10, SMOL_LAYERS, 2)
    assert {"accuracy", "ece", "mce"} <= set(report.final)
    assert list(tmp_path.iterdir()) == [], "the API wrote files into the working directory"


def lm_eval_acc_norm(lm, records) -> tuple[np.ndarray, np.ndarray]:
    """lm-eval's ARC scoring written out: context "Question: {q}\nAnswer:", continuation
    " " + option, tokens = encode(context + continuation)[len(encode(context)):], the model's own
    log-softmax summed over them; acc_norm divides by len(option). Returns (ll / len, predictions)."""
    tok, out = lm.tokenizer, []
    for record in records:
        context = f"Question: {record.question}\nAnswer:"
        ctx = tok(context)["input_ids"]
        plain = tok(context, add_special_tokens=False)["input_ids"]
        row = []
        for option in record.options:
            cont = tok(context + " " + option, add_special_tokens=False)["input_ids"][len(plain):]
            with torch.inference_mode():
                logits = lm.model(input_ids=torch.tensor([ctx + cont])).logits[0].double()
            logp = torch.log_softmax(logits[len(ctx) - 1:-1], -1)
            row.append(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()) / len(option))
        out.append(row)
    width = max(map(len, out))
    scores = np.array([row + [-np.inf] * (width - len(row)) for row in out])
    return scores, scores.argmax(1)


def test_cloze_job_equals_lm_eval_scoring(lm, tmp_path):
    """ARC-Easy's default (cloze, acc_norm) job on the real SmolLM2: its last layer is lm-eval's
    log-likelihood scoring of the same prompts, example by example."""
    spec = spec_of("dataset=arc_easy", "dataset.limit=6", "tracker=none", "probe.progress=false",
                   "output.plots=false", "metrics.bootstrap=0")
    summary = job_mod.run_job(spec, tmp_path)
    assert (summary["answer_format"], summary["cloze_norm"]) == ("cloze", "char")
    records = calibrate.load_dataset("arc_easy", limit=6)
    expected, predicted = lm_eval_acc_norm(lm, records)
    with np.load(tmp_path / "predictions.npz") as saved:
        scores, probs = saved["option_logits"][:, -1], saved["probs"]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-4)
    labels = np.array([r.label for r in records])
    assert summary["final"]["accuracy"] == pytest.approx(float(np.mean(predicted == labels)))
    assert summary["chance_accuracy"] == pytest.approx(np.mean([1 / len(r.options) for r in records]))
    assert "emergence_layer" in summary  # None without bootstrap intervals (metrics.bootstrap=0)
    assert summary["emergence_layer"] is None
    table = pd.read_csv(tmp_path / "layers.csv")
    assert list(table["layer"]) == list(range(SMOL_LAYERS))
    np.testing.assert_allclose(table["accuracy"], (probs.argmax(-1) == labels[:, None]).mean(0))
    # samples_lmeval.jsonl: lm-eval's raw log-likelihoods (acc_norm's before the division)
    samples = [json.loads(line) for line in (tmp_path / "samples_lmeval.jsonl").open()]
    for sample, record, row in zip(samples, records, expected):
        raw = [r[0] for r in sample["filtered_resps"]]
        np.testing.assert_allclose(raw, [s * len(o) for s, o in zip(row, record.options)],
                                   rtol=0, atol=1e-3)
        assert sample["arguments"][0] == [f"Question: {record.question}\nAnswer:",
                                          " " + record.options[0]]
        assert sample["acc_norm"] == float(np.argmax(row[:len(record.options)]) == record.label)


# ---------------------------------------------------------------- bad input through the CLI

@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_bad_input_cli(case, background):
    run, names = background[case.id].result()
    lines = run.lines()
    assert run.rc != 0, explain(run)
    assert "Traceback" not in run.stderr, explain(run)
    assert not result_files(run.cwd), f"result files left: {result_files(run.cwd)}"
    # CPU time, not wall time: the machine may be shared; loading and probing would take longer
    assert run.cpu_seconds < QUICK_S, explain(run)
    assert run.seconds < 3 * QUICK_S, explain(run)
    assert not any(WEIGHTS_MARKER in line for line in lines), explain(run)
    assert run.rc == 2, explain(run)
    assert len(lines) == 1, f"expected one error line: {explain(run)}"
    assert "error: " in lines[0], explain(run)
    assert all(n in lines[0] for n in names), explain(run)
    assert all(a in run.stderr for a in case.accepts), explain(run)


# ---------------------------------------------------------------- multirun

def test_multirun_with_an_invalid_value_fails_before_any_job(background):
    """limit 6, 0 (invalid), 8: known before anything runs, so no job starts: one line, exit 2,
    no sweep folder. (A job that fails at run time is recorded and the sweep goes on:
    test_faults.py::test_runtime_failure_in_a_sweep_is_recorded.)"""
    run = background["sweep"].result()
    assert run.rc == 2, explain(run)
    assert run.lines() == [next(l for l in run.lines() if "error:" in l)], explain(run)
    assert "limit 0 is invalid" in run.stderr, explain(run)
    assert not (run.cwd / "sweep").exists()
    assert run.cpu_seconds < QUICK_S, explain(run)


# ---------------------------------------------------------------- the default job, end to end

@pytest.fixture(scope="module")
def e2e(background) -> Run:
    run = background["e2e"].result()
    assert run.rc == 0, explain(run)
    return run


def job_dir(run: Run) -> Path:
    return run.cwd / "out"


def test_e2e_files(e2e):
    out = job_dir(e2e)
    metrics = json.loads((out / "metrics.json").read_text())
    peak = metrics["peak_ece_layer"] is not None  # the peak's diagram only where there is one
    plots = [p for p in PLOTS if peak or p != "reliability_peak_ece.png"]
    for name in (*RESULT_NAMES, *plots):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in plots:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (out / "reliability_peak_ece.png").exists() == peak
    assert sorted(metrics["plots"]) == sorted(p.removesuffix(".png") for p in plots)
    there = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "run.log")
    assert metrics["files"] == there  # the manifest: exactly this result's files
    assert WEIGHTS_MARKER in e2e.stderr  # the marker the bad-input cases look for is real
    assert not (e2e.cwd / "outputs").exists(), "hydra.run.dir was not honored"


@pytest.mark.parametrize("peak", [None, 2])
def test_the_peak_diagram_is_the_peak_metrics_json_names(tmp_path, monkeypatch, peak):
    """reliability_peak_ece.png shows the layer of ``find_phases``'s peak (not the largest ECE
    anywhere, here layer 0), and is not drawn (nor listed) when there is no peak."""
    from types import SimpleNamespace

    from calibrate.core.phases import Phases
    from calibrate.io import plots as plots_mod

    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1.0, 1.0], size=(12, 5))  # 12 examples, layers 0..4, 2 options
    table = pd.DataFrame({"layer": range(5), "accuracy": [0.5, 0.6, 0.7, 0.7, 0.7],
                          "ece": [0.4, 0.1, 0.3, 0.2, 0.1], "mce": 0.5, "confidence": 0.6})
    report = SimpleNamespace(result=SimpleNamespace(probs=probs, labels=np.arange(12) % 2),
                             table=table, prompt_set=SimpleNamespace(option_ids=np.ones((12, 2))))
    phases = (Phases(2, None, None, [], "none", kind="plateau_no_correction") if peak is None
              else Phases(2, peak, 0.3, [3, 4], "peak", kind="correction"))
    drawn = {}

    def record(p, labels, path, title, *args, **kwargs):
        drawn[Path(path).name] = (p, title)
        return path

    monkeypatch.setattr(plots_mod, "plot_reliability", record)
    settings = calibrate.typed_config([]).metrics
    out = job_mod._plots(report, tmp_path, "t", settings, phases)
    np.testing.assert_array_equal(drawn["reliability_final.png"][0], probs[:, 4])
    if peak is None:
        assert "reliability_peak_ece" not in out and "reliability_peak_ece.png" not in drawn
    else:
        assert out["reliability_peak_ece"] == tmp_path / "reliability_peak_ece.png"
        p, title = drawn["reliability_peak_ece.png"]
        np.testing.assert_array_equal(p, probs[:, 2])
        assert "layer 2 (ECE peak, 0.3000)" in title


def test_e2e_log_and_headline(e2e):
    """run.log holds the job's log; the console ends with the headline and the results folder;
    progress bars stay on the terminal."""
    out = job_dir(e2e)
    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["final"]
    lines = e2e.lines()
    assert lines[-1] == f"[calibrate] results in {out}", explain(e2e)
    headline = lines[-2]
    assert f"final accuracy {final['accuracy']:.3f} [{final['accuracy_lo']:.3f}, " in headline
    assert f"ECE {final['ece']:.4f} [{final['ece_lo']:.3f}, {final['ece_hi']:.3f}]" in headline
    assert f"MCE {final['mce']:.4f}" in headline and metrics["phase_note"] in headline
    log = (out / "run.log").read_text()
    assert f"results in {out}" in log and f"final accuracy {final['accuracy']:.3f}" in log
    assert WEIGHTS_MARKER not in log and "it/s" not in log


def test_e2e_tables(e2e):
    out = job_dir(e2e)
    table = pd.read_csv(out / "layers.csv")
    assert list(table["layer"]) == list(range(SMOL_LAYERS))
    assert {"layer", "accuracy", "confidence", "ece", "mce", "brier", "nll"} <= set(table.columns)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    assert (metrics["model"], metrics["dataset"], metrics["split"]) == ("smollm2", "sst2", "validation")
    assert metrics["n_examples"] == 24 and metrics["num_layers"] == SMOL_LAYERS
    assert metrics["answer_format"] == "verbalizer"
    last = table.iloc[-1]
    assert set(metrics["final"]) == set(table.columns) - {"layer"}
    for key, value in metrics["final"].items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            assert pd.isna(last[key]), key
        else:
            assert value == pytest.approx(float(last[key]), rel=1e-12, abs=1e-15), key


def test_e2e_predictions_match_table(e2e):
    out = job_dir(e2e)
    cfg = OmegaConf.load(out / ".hydra" / "config.yaml")
    n_bins, binning = int(cfg.metrics.n_bins), str(cfg.metrics.binning)
    table = pd.read_csv(out / "layers.csv")
    pred = np.load(out / "predictions.npz")
    probs, labels = pred["probs"], pred["labels"]
    assert probs.shape == (24, SMOL_LAYERS, 2)
    assert pred["option_logits"].shape == (24, SMOL_LAYERS, 2) and labels.shape == (24,)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-9)
    for layer in range(SMOL_LAYERS):
        p = probs[:, layer]
        confidence, correct = p.max(axis=-1), (p.argmax(axis=-1) == labels).astype(float)
        row = table.iloc[layer]
        assert correct.mean() == pytest.approx(row["accuracy"], abs=1e-12)
        assert ece(confidence, correct, n_bins, binning) == pytest.approx(row["ece"], abs=1e-12)
        assert mce(confidence, correct, n_bins, binning) == pytest.approx(row["mce"], abs=1e-12)


def test_e2e_last_layer_is_the_model(e2e, lm):
    """The lens at the last layer gives the model's own logits on the option tokens."""
    from calibrate.tasks.prompts import render_prompt

    pred = np.load(job_dir(e2e) / "predictions.npz")
    ds = dataset_config("sst2")
    records = calibrate.load_dataset("sst2", limit=24)
    assert [r.label for r in records] == list(pred["labels"])
    tok = lm.tokenizer
    ids = [tok(w, add_special_tokens=False)["input_ids"] for w in ds.verbalizer]
    assert all(len(i) == 1 for i in ids)
    assert (pred["option_ids"] == np.array([i[0] for i in ids])).all()
    fp32 = lm.model.dtype == torch.float32  # a GPU runs bfloat16: ~8 bits of mantissa
    for i in (0, 23):
        prompt = render_prompt(ds.template, records[i], ds.subject)
        enc = tok(prompt, return_tensors="pt").to(lm.device)
        with torch.no_grad():
            logits = lm.model(**enc).logits[0, -1].float().cpu()
        ref = logits[torch.from_numpy(pred["option_ids"][i])].numpy()
        tol = 1e-4 if fp32 else 0.05 * max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(pred["option_logits"][i, -1], ref, rtol=0, atol=tol)


def test_e2e_wandb_offline_run(e2e):
    runs = list((job_dir(e2e) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run_dir = runs[0]
    assert (run_dir / "files").is_dir()
    config_yaml = run_dir / "files" / "config.yaml"
    records = list(run_dir.glob("run-*.wandb"))
    assert len(records) == 1
    data = records[0].read_bytes()
    # the job config and the per-layer series are in the run (config.yaml only appears on sync)
    assert (config_yaml.is_file() and "n_bins" in config_yaml.read_text()) or b"n_bins" in data
    assert b"sst2" in data and b"layer/ece" in data
    assert b"smollm2-sst2-dataset.limit=24,tracker=wandb" in data  # a single run's group: its name


# ---------------------------------------------------------------- the other offline datasets

@pytest.mark.parametrize("name", sorted(SHARED_CASES))
def test_shared_dataset_through_cli(name, background):
    if not (SHARED / "data").is_dir():
        pytest.skip(f"{SHARED / 'data'} is absent (only these machines carry it)")
    run = background[name].result()
    assert run.rc == 0, explain(run)
    out = run.cwd / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["dataset"] == name
    assert metrics["n_examples"] == 6
    assert metrics["answer_format"] == SHARED_CASES[name][1]
    if name == "rotten_tomatoes":
        assert metrics["option_strings"] == [" negative", " positive"]
    else:
        assert metrics["n_options"] >= 2
        assert metrics["option_strings"] == [f" {chr(65 + k)}" for k in range(metrics["n_options"])]
    assert len(pd.read_csv(out / "layers.csv")) == SMOL_LAYERS
