"""One job, whatever its study: spec → context → study → write, plot, log.

Everything that can fail on bad input runs before the model's weights are read
(:func:`prepare`); the study (:mod:`calibrate.studies`) runs on the context and returns a typed
result; the job writes the common files (layers.csv, predictions.npz, plots, metrics.json last,
as the completion marker), lets the result write its own, and logs both. A failing job leaves
no result file behind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibrate.config.spec import JobSpec, check_shape
from calibrate.core.metrics import MetricSettings
from calibrate.core.phases import Phases, emergence_layer, find_phases, phases_to_dict
from calibrate.engine.probe import ProbeSettings
from calibrate.engine.scoring import score, scoring_of
from calibrate.io import results, tidy
from calibrate.io.provenance import code_identity
from calibrate.io.results import OutputSettings
from calibrate.io.track import Tracker, open_tracker
from calibrate.model.load import (
    LoadedModel,
    check_device,
    held_model,
    load_model,
    load_tokenizer,
    model_shape,
    resolve_source,
)
from calibrate.studies import get_study
from calibrate.studies.job_context import (
    JobContext,
    ProbeReport,
    cached_probe,
    make_report,
    measure,
)
from calibrate.studies.study import StudyResult
from calibrate.tasks.dataset_config import DatasetConfig
from calibrate.tasks.prompts import PromptSet, build_prompts
from calibrate.tasks.shots import load_with_exemplars

LOG = logging.getLogger("calibrate")
RESULT_FILES = [results.LAYERS_FILE, results.PREDICTIONS_FILE, results.METRICS_FILE,
                "layer_curves.png", "reliability_final.png", "reliability_peak_ece.png",
                "risk_coverage.png", "predictions.parquet", "samples_lmeval.jsonl"]
__all__ = ["ProbeReport", "cached_probe", "measure", "prepare", "probe_prompts", "probe_records",
           "run_job"]


def probe_records(loaded: LoadedModel, records: Sequence[Any], dataset: DatasetConfig,
                  probe: ProbeSettings, metrics: MetricSettings,
                  keep_layers: Sequence[int] = ()) -> ProbeReport:
    """Build prompts, score every layer and measure it; no files are written."""
    prompt_set = build_prompts(records, dataset, loaded.tokenizer)
    return probe_prompts(loaded, prompt_set, probe, metrics, keep_layers)


def probe_prompts(loaded: LoadedModel, prompt_set: PromptSet, probe: ProbeSettings,
                  metrics: MetricSettings, keep_layers: Sequence[int] = ()) -> ProbeReport:
    """Score ready prompts at every layer (single token or cloze) and measure every layer."""
    return make_report(score(loaded, prompt_set, probe.keeping(keep_layers)), prompt_set, metrics)


def prepare(spec: JobSpec) -> JobContext:
    """Records, the model's shape (checked against the spec), prompts, then the weights."""
    cache = spec.cache_dir
    check_device(spec.model.device)
    records, exemplars = load_with_exemplars(spec.dataset, spec.prompt, cache)
    source = resolve_source(spec.model, cache)
    shape = model_shape(source, spec.model)  # the config alone: no weights read yet
    check_shape(spec, shape.num_blocks, shape.hidden_size)
    get_study(spec.study).check_shape(spec, shape.num_blocks, shape.hidden_size)
    held = held_model(spec.model, cache)  # a sweep's later jobs: the model is already loaded
    tokenizer = held.tokenizer if held is not None else load_tokenizer(source, spec.model)
    prompt_set = build_prompts(records, spec.dataset, tokenizer, max_length=shape.context_length,
                               max_chars_per_token=spec.checks.max_chars_per_token,
                               style=spec.prompt, exemplars=exemplars)
    return JobContext(spec, load_model(spec.model, cache, tokenizer=tokenizer), prompt_set)


def chance_accuracy(prompt_set: PromptSet) -> float:
    """Expected accuracy of a uniform guess: the mean over examples of 1 / (number of options)."""
    return float(np.mean(1.0 / (prompt_set.option_ids >= 0).sum(axis=1)))


def _plots(report: ProbeReport, job_dir: Path, title: str, metrics: MetricSettings,
           phases: Phases) -> dict[str, Path]:
    """The common figures. The peak's reliability diagram is of the ECE peak metrics.json and
    the report name (``phases.peak_ece_layer``); without a peak it is not drawn."""
    from calibrate.io.plots import plot_layer_curves, plot_reliability, plot_risk_coverage

    probs, labels = report.result.probs, report.result.labels
    n_bins, binning = metrics.n_bins, metrics.binning
    plots = {
        "layer_curves": plot_layer_curves(report.table, job_dir / "layer_curves.png", title,
                                          phases=phases, chance=chance_accuracy(report.prompt_set)),
        "reliability_final": plot_reliability(probs[:, -1], labels, job_dir / "reliability_final.png",
                                              f"{title}: final layer", n_bins, binning),
    }
    peak = phases.peak_ece_layer
    if peak is not None:
        at = list(report.table["layer"]).index(peak)  # the row of that layer in probs
        plots["reliability_peak_ece"] = plot_reliability(
            probs[:, at], labels, job_dir / "reliability_peak_ece.png",
            f"{title}: layer {peak} (ECE peak, {phases.peak_ece:.4f})", n_bins, binning)
    curves = {f"layer {report.table['layer'].iloc[i]}{name}": (probs[:, i].max(-1),
                                                            probs[:, i].argmax(-1) == labels)
              for i, name in _selective_layers(report.table, phases)}
    plots["risk_coverage"] = plot_risk_coverage(curves, job_dir / "risk_coverage.png",
                                                f"{title}: selective prediction")
    return plots


def _selective_layers(table: Any, phases: Phases) -> list[tuple[int, str]]:
    """Rows of the risk–coverage figure: the last layer, the accuracy plateau's start and the
    ECE peak (where there are), and the layer of lowest AURC; each named for all it is."""
    layers = list(table["layer"])
    rows = [(len(table) - 1, "last")]
    for layer, name in ((phases.plateau_layer, "plateau"), (phases.peak_ece_layer, "ECE peak")):
        if layer is not None:
            rows.append((layers.index(layer), name))
    if "aurc" in table.columns:
        rows.append((int(table["aurc"].to_numpy().argmin()), "lowest AURC"))
    seen: dict[int, list[str]] = {}
    for i, name in rows:
        seen.setdefault(i, []).append(name)
    return [(i, f" ({', '.join(names)})") for i, names in sorted(seen.items())]


def _summary(ctx: JobContext, report: ProbeReport, phases: dict, elapsed: float) -> dict[str, Any]:
    ds, loaded, chance = ctx.spec.dataset, ctx.loaded, chance_accuracy(report.prompt_set)
    return {
        "status": "complete", "model": loaded.name, "model_source": loaded.source,
        "model_type": loaded.adapter.model_type, "unembed_hash": loaded.unembed_hash,
        "dataset": ds.name, "split": ds.split, "n_examples": len(report.result.labels),
        "n_options": int(report.prompt_set.option_ids.shape[1]), "answer_format": ds.answer_format,
        **scoring_of(report.prompt_set).summary_fields(report.prompt_set),
        "prompt": dict(report.prompt_set.style or {}),
        "data_checks": checks.summary() if (checks := report.prompt_set.data_checks) else None,
        "num_layers": report.result.num_layers, **report.info, "final": report.final,
        **phases, "chance_accuracy": chance,
        "emergence_layer": emergence_layer(report.table, chance), "elapsed_s": round(elapsed, 3),
        "study": ctx.spec.study, "readout": ctx.readout.summary(),
        "config_hash": ctx.spec.identity, "config": ctx.spec.relevant(),
        "model_identity": loaded.identity(), "code": code_identity(),
    }


def write_report(report: ProbeReport, job_dir: Path, summary: Mapping[str, Any],
                 output: OutputSettings, plots: dict[str, Path]) -> None:
    """Write the common files; metrics.json last, as the completion marker."""
    results.write_csv(job_dir / results.LAYERS_FILE, report.table)
    if output.predictions:
        res = report.result
        arrays = {"labels": res.labels, "probs": res.probs, "option_logits": res.option_logits,
                  "option_ids": report.prompt_set.option_ids}
        if res.option_mass is not None:
            arrays["option_mass"] = res.option_mass
        results.write_npz(job_dir / results.PREDICTIONS_FILE, **arrays)
        write_tidy(report, job_dir)
    results.write_json(job_dir / results.METRICS_FILE, {**summary, "plots": sorted(plots),
                                                        "files": manifest(job_dir)})


def write_tidy(report: ProbeReport, job_dir: Path) -> None:
    """predictions.parquet and, where the last layer's log-likelihoods are known,
    samples_lmeval.jsonl (:mod:`calibrate.io.tidy`)."""
    res, prompt_set = report.result, report.prompt_set
    tidy.write_parquet(job_dir / tidy.PARQUET_FILE, tidy.tidy_predictions(
        res.probs, res.option_logits, res.labels, prompt_set.examples, prompt_set.option_strings))
    logliks, norm = _last_layer_logliks(report)
    if logliks is None:
        LOG.info("samples_lmeval.jsonl not written: the option mass at the last layer is needed "
                 "(probe.option_mass=final or all)")
        return
    if prompt_set.is_cloze:
        conts = [[" " + o for o in e.options] for e in prompt_set.examples or ()]
    else:
        conts = [prompt_set.option_strings[:int((ids >= 0).sum())] for ids in prompt_set.option_ids]
    tidy.write_jsonl(job_dir / tidy.SAMPLES_FILE, tidy.lmeval_samples(
        prompt_set.prompts, conts, logliks, res.labels, norm))


def _last_layer_logliks(report: ProbeReport) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The last layer's full-vocabulary log-likelihood of every option [N, K], and for cloze
    the length-normalised scores lm-eval's acc_norm compares (None where not known)."""
    from calibrate.tasks.continuations import cloze_divisors

    res, prompt_set = report.result, report.prompt_set
    scores = res.option_logits[:, -1].astype(np.float64)
    if prompt_set.is_cloze:
        if prompt_set.examples is None:
            return None, None
        divisors = np.ones_like(scores)
        found = cloze_divisors(list(prompt_set.requests), prompt_set.cloze_norm or "none")
        divisors[:, :found.shape[1]] = found
        raw = scores * divisors
        chars = np.ones_like(scores)
        for i, e in enumerate(prompt_set.examples):
            chars[i, :len(e.options)] = [len(o) for o in e.options]
        return raw, raw / chars
    if res.option_mass is None:
        return None, None
    return tidy.option_logprobs(scores, res.option_mass[:, -1]), None


def _all_files() -> list[str]:
    """Every file a job of any study may write (removed before a job runs and when it fails)."""
    found, todo = set(), [StudyResult]
    while todo:
        cls = todo.pop()
        found.update(cls.files)
        todo.extend(cls.__subclasses__())
    return RESULT_FILES + sorted(found)


# What ``calibrate export`` writes into a job folder by default: made from its result.
EXPORT_FILES = ("direction.gguf", "lmeval_steer_eta*.pt")


def clear_results(job_dir: Path) -> None:
    """Before a job (re)runs into ``job_dir``: remove every file a job of any study may write,
    ``error.json`` and the exports of an earlier result, so that the folder never keeps another
    config's files beside the new result (a rerun that writes fewer files)."""
    job_dir = Path(job_dir)
    results.remove_outputs(job_dir, [*_all_files(), results.ERROR_FILE])
    for pattern in EXPORT_FILES:
        for path in job_dir.glob(pattern):
            path.unlink(missing_ok=True)


def manifest(job_dir: Path) -> list[str]:
    """The result files in ``job_dir`` (metrics.json included, written last): after
    :func:`clear_results`, exactly the files this result wrote."""
    names = set(_all_files()) - {results.METRICS_FILE}
    return sorted([n for n in names if (Path(job_dir) / n).is_file()] + [results.METRICS_FILE])


def option_mass_check(report: ProbeReport, threshold: float) -> float | None:
    """The final layer's mean full-vocabulary mass on the options (None when not measured:
    cloze scoring, ``probe.option_mass=none``); a warning, with the number, below
    ``threshold`` (``checks.option_mass_warn``)."""
    if "option_mass" not in report.table:
        return None
    mass = float(report.table["option_mass"].iloc[-1])
    if not np.isfinite(mass):
        return None
    if mass < threshold:
        LOG.warning("the options hold %.1f%% of the model's probability at the last layer (mean "
                    "over examples; checks.option_mass_warn=%g): their probabilities are a "
                    "renormalised sliver of its output, so these calibration figures describe "
                    "little of the model", 100 * mass, threshold)
    return mass


def finish(ctx: JobContext, result: StudyResult, job_dir: Path, tracker: Tracker,
           start: float) -> dict[str, Any]:
    """Write, plot and log a study's result; returns the metrics summary."""
    spec = ctx.spec
    mass = option_mass_check(result.report, spec.checks.option_mass_warn)
    title = f"{ctx.loaded.name} on {spec.dataset.name}"
    if mass is not None:
        title += f" (options hold {mass:.1%} of the mass)"
    phases = find_phases(result.report.table, spec.phases)
    result.write(job_dir)
    plots: dict[str, Path] = {}
    if spec.output.plots:
        plots.update(result.plot(job_dir, title))
        plots.update(_plots(result.report, job_dir, title, spec.metrics, phases))
    summary = {**_summary(ctx, result.report, phases_to_dict(phases), time.perf_counter() - start),
               **result.summary}
    if mass is not None:
        summary["option_mass"] = mass
        summary["option_mass_warning"] = bool(mass < spec.checks.option_mass_warn)
    rows, tables = result.summary_rows(), result.sweep_tables()
    if rows:
        summary["summary_rows"] = rows
    if tables:
        summary["sweep_tables"] = tables
    summary["headline_extra"] = result.headline()
    write_report(result.report, job_dir, summary, spec.output, plots)
    tracker.log_layers(result.report.table)
    result.log(tracker, job_dir)
    tracker.log_images(plots)
    tracker.log_summary({**_flat_summary(summary), **result.tracker_summary()})
    return summary


def run_job(spec: JobSpec, job_dir: Path, name: str = "job",
            group: str | None = None) -> dict[str, Any]:
    """Run one job (its study) into ``job_dir``; returns the metrics summary."""
    start = time.perf_counter()
    job_dir = Path(job_dir)
    study = get_study(spec.study)
    ctx = prepare(spec)
    clear_results(job_dir)  # nothing of an earlier result stays beside this one
    tracker: Tracker = Tracker()
    try:
        tracker = open_tracker(spec.tracker, job_dir, name, group, spec.study, spec.recorded)
        summary = finish(ctx, study.run(ctx), job_dir, tracker, start)
    except BaseException:
        results.remove_outputs(job_dir, _all_files())
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    return summary


def _flat_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The run-summary values every job has (a study adds its own: ``tracker_summary``)."""
    flat = {f"final/{k}": v for k, v in summary["final"].items()}
    for key in ("plateau_layer", "peak_ece_layer", "peak_ece", "emergence_layer", "n_examples"):
        flat[key] = summary.get(key)  # the same keys in every run; None when there is no peak
    return flat
