"""One job: validate, load data, build prompts, load the model, probe, measure, write, track.

The Hydra entry point (:mod:`calibrate.run`) is a thin layer over :func:`run_job`; notebooks
use :func:`probe_records` directly (see :mod:`calibrate.api`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from calibrate import ablate, intervene, probe_cache, results
from calibrate.data import load_records
from calibrate.metrics import ECE_MARGIN, bootstrap_layer_ci, layer_table
from calibrate.models import (LoadedModel, check_device, load_model, load_tokenizer, model_shape,
                              resolve_source)
from calibrate.phases import emergence_layer, find_phases, phases_to_dict
from calibrate.probe import ProbeResult, ProbeSettings
from calibrate.prompts import PromptSet, build_prompts
from calibrate.scoring import score
from calibrate.spec import JobSpec, build_spec, check_shape
from calibrate.track import Tracker, open_tracker

LOG = logging.getLogger("calibrate")

RESULT_FILES = [results.LAYERS_FILE, results.PREDICTIONS_FILE, results.METRICS_FILE,
                "layer_curves.png", "reliability_final.png", "reliability_peak_ece.png"]


@dataclass
class ProbeReport:
    """What a probe of one model on one dataset produced."""

    table: pd.DataFrame  # one row per layer
    result: ProbeResult
    prompt_set: PromptSet
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        """Metrics of the last layer (the model's own prediction)."""
        return {k: float(v) for k, v in self.table.iloc[-1].items() if k != "layer"}


def measure(result: ProbeResult, metrics_cfg: Mapping[str, Any]) -> pd.DataFrame:
    """The per-layer metrics table of a probe result (plus the mean option mass per layer and,
    with ``metrics.bootstrap`` > 0, bootstrap intervals of accuracy and of the true ECE, see
    :func:`calibrate.metrics.bootstrap_layer_ci`)."""
    n_bins, binning = int(metrics_cfg["n_bins"]), str(metrics_cfg["binning"])
    table = layer_table(result.probs, result.labels, n_bins=n_bins, binning=binning,
                        extra_bins=tuple(metrics_cfg.get("extra_bins") or ()))
    n_boot = int(metrics_cfg.get("bootstrap") or 0)
    for metric in ("accuracy", "ece") if n_boot else ():
        ci = bootstrap_layer_ci(result.probs, result.labels, metric, n_boot=n_boot,
                                alpha=float(metrics_cfg["alpha"]), seed=int(metrics_cfg["seed"]),
                                n_bins=n_bins, binning=binning,
                                ece_margin=float(metrics_cfg.get("ece_margin", ECE_MARGIN)))
        table[f"{metric}_lo"], table[f"{metric}_hi"] = ci["lo"].to_numpy(), ci["hi"].to_numpy()
    if result.option_mass is not None:
        mass = np.full(len(table), np.nan)
        mass[-result.option_mass.shape[1]:] = result.option_mass.mean(axis=0)
        table["option_mass"] = mass
    return table


def probe_records(loaded: LoadedModel, records: Sequence[Any], dataset_cfg: Mapping[str, Any],
                  probe_cfg: Mapping[str, Any], metrics_cfg: Mapping[str, Any],
                  keep_layers: Sequence[int] = ()) -> ProbeReport:
    """Build prompts, run the probe and measure every layer; no files are written."""
    prompt_set = build_prompts(records, dataset_cfg, loaded.tokenizer)
    return probe_prompts(loaded, prompt_set, probe_cfg, metrics_cfg, keep_layers)


def probe_prompts(loaded: LoadedModel, prompt_set: PromptSet, probe_cfg: Mapping[str, Any],
                  metrics_cfg: Mapping[str, Any], keep_layers: Sequence[int] = ()) -> ProbeReport:
    """Run the probe (or cloze scoring) on ready prompts and measure every layer."""
    result = score(loaded, prompt_set, ProbeSettings.from_config(probe_cfg, keep_layers))
    return _report(result, prompt_set, metrics_cfg)


def _prepare(spec: JobSpec) -> tuple[list[Any], PromptSet, LoadedModel]:
    """Everything that can fail on bad input runs before the model weights are read."""
    cfg = spec.config
    cache = cfg.get("cache_dir")
    check_device(str(cfg["model"].get("device", "auto")))
    records = load_records(cfg["dataset"], cache)
    source = resolve_source(cfg["model"], cache)
    shape = model_shape(source, cfg["model"])  # the config alone: no weights read yet
    check_shape(spec, shape.num_blocks, shape.hidden_size)
    tokenizer = load_tokenizer(source, cfg["model"])
    prompt_set = build_prompts(records, cfg["dataset"], tokenizer, max_length=shape.context_length)
    loaded = load_model(cfg["model"], cache, tokenizer=tokenizer)
    return records, prompt_set, loaded


def chance_accuracy(prompt_set: PromptSet) -> float:
    """Expected accuracy of a uniform guess: the mean over examples of 1 / (number of options)."""
    return float(np.mean(1.0 / (prompt_set.option_ids >= 0).sum(axis=1)))


def _plots(report: ProbeReport, job_dir: Path, title: str, metrics_cfg: Mapping[str, Any],
           phases: Any) -> dict[str, Path]:
    from calibrate.plots import plot_layer_curves, plot_reliability

    probs, labels = report.result.probs, report.result.labels
    n_bins, binning = int(metrics_cfg["n_bins"]), str(metrics_cfg["binning"])
    peak = int(report.table["ece"].idxmax())
    chance = chance_accuracy(report.prompt_set)
    return {
        "layer_curves": plot_layer_curves(report.table, job_dir / "layer_curves.png", title,
                                          phases=phases, chance=chance),
        "reliability_final": plot_reliability(probs[:, -1], labels, job_dir / "reliability_final.png",
                                              f"{title}: final layer", n_bins, binning),
        "reliability_peak_ece": plot_reliability(probs[:, peak], labels,
                                                 job_dir / "reliability_peak_ece.png",
                                                 f"{title}: layer {peak} (highest ECE)", n_bins, binning),
    }


def _summary(cfg: Mapping[str, Any], report: ProbeReport, loaded: LoadedModel, phases: dict,
             elapsed: float) -> dict[str, Any]:
    ds, chance = cfg["dataset"], chance_accuracy(report.prompt_set)
    return {
        "status": "complete", "model": loaded.name, "model_source": loaded.source,
        "model_type": loaded.adapter.model_type, "unembed_hash": loaded.unembed_hash,
        "dataset": ds["name"], "split": ds.get("split"), "n_examples": len(report.result.labels),
        "n_options": int(report.prompt_set.option_ids.shape[1]), "answer_format": ds["answer_format"],
        **({"cloze_norm": report.prompt_set.cloze_norm} if report.prompt_set.is_cloze else {}),
        "num_layers": report.result.num_layers, **report.info, "final": report.final,
        **phases, "chance_accuracy": chance,
        "emergence_layer": emergence_layer(report.table, chance), "elapsed_s": round(elapsed, 3),
    }


def write_report(report: ProbeReport, job_dir: Path, summary: Mapping[str, Any],
                 output_cfg: Mapping[str, Any], plots: dict[str, Path]) -> None:
    """Write the job's files; metrics.json last, as the completion marker."""
    results.write_csv(job_dir / results.LAYERS_FILE, report.table)
    if output_cfg.get("predictions", True):
        res = report.result
        arrays = {"labels": res.labels, "probs": res.probs, "option_logits": res.option_logits,
                  "option_ids": report.prompt_set.option_ids}
        if res.option_mass is not None:
            arrays["option_mass"] = res.option_mass
        results.write_npz(job_dir / results.PREDICTIONS_FILE, **arrays)
    results.write_json(job_dir / results.METRICS_FILE, {**summary, "plots": sorted(plots)})


def cached_probe(loaded: LoadedModel, prompt_set: PromptSet, probe_cfg: Mapping[str, Any],
                 keep_layers: Sequence[int] = (), cache_dir: str | Path | None = None) -> ProbeResult:
    """:func:`calibrate.scoring.score` through the in-process and on-disk result cache."""
    settings = ProbeSettings.from_config(probe_cfg, keep_layers)
    # Keyed by the weights as loaded (fingerprint, dtype, device), never by a config name.
    ident = loaded.identity()
    weights = f"{ident['fingerprint']}|{ident['dtype']}|{ident['device']}"
    key = probe_cache.probe_key(weights, prompt_set, settings)
    result = probe_cache.load(key, cache_dir)
    if result is None:
        result = score(loaded, prompt_set, settings)
        probe_cache.store(key, result, cache_dir)
    return result



def _report(result: ProbeResult, prompt_set: PromptSet, metrics_cfg: Mapping[str, Any]) -> ProbeReport:
    info = {"adds_bos": prompt_set.adds_bos, "option_strings": prompt_set.option_strings,
            "padding_efficiency": result.padding_efficiency}
    return ProbeReport(measure(result, metrics_cfg), result, prompt_set, info)


def run_job(spec: JobSpec | Mapping[str, Any], job_dir: Path, name: str = "job",
            group: str | None = None, config_dict: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run one job (its study: probe, steering or an ablation) into ``job_dir``; returns the
    metrics summary. A config mapping is turned into a :class:`JobSpec` first."""
    start = time.perf_counter()
    spec = spec if isinstance(spec, JobSpec) else build_spec(spec)
    cfg, job_dir = spec.config, Path(job_dir)
    _, prompt_set, loaded = _prepare(spec)
    tracker: Tracker = Tracker()
    try:
        tracker = open_tracker(cfg["tracker"], job_dir, name, group, spec.study,
                               config_dict or cfg)
        title = f"{loaded.name} on {cfg['dataset']['name']}"
        extra, plots, report = {}, {}, None
        if spec.study == "steering":
            report, extra, plots = _steering(spec, loaded, prompt_set, job_dir, title, tracker)
        elif spec.study != "probe":
            report, extra, plots = _ablation(spec, loaded, prompt_set, job_dir, title, tracker)
        else:
            result = cached_probe(loaded, prompt_set, cfg["probe"], (), cfg.get("cache_dir"))
            report = _report(result, prompt_set, cfg["metrics"])
        phases = find_phases(report.table, cfg["phases"])
        if cfg["output"].get("plots"):
            plots.update(_plots(report, job_dir, title, cfg["metrics"], phases))
        summary = {**_summary(cfg, report, loaded, phases_to_dict(phases), time.perf_counter() - start),
                   **extra, **_identity(spec, loaded)}
        write_report(report, job_dir, summary, cfg["output"], plots)
        tracker.log_layers(report.table)
        tracker.log_images(plots)
        tracker.log_summary(_flat_summary(summary))
    except BaseException:
        results.remove_outputs(job_dir, RESULT_FILES + intervene.FILES + ablate.FILES)
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    return summary


def _identity(spec: JobSpec, loaded: LoadedModel) -> dict[str, Any]:
    """What produced the result: the study, the config hash and config, the model as loaded."""
    return {"study": spec.study, "config_hash": spec.identity, "config": spec.relevant(),
            "model_identity": loaded.identity()}


def _steering(spec: JobSpec, loaded: LoadedModel, prompt_set: PromptSet, job_dir: Path,
              title: str, tracker: Tracker) -> tuple[ProbeReport, dict[str, Any], dict[str, Path]]:
    """Run the steering part; the report it returns covers the evaluation split, unsteered."""
    cfg = spec.config

    def probe(ps: PromptSet, keep: Sequence[int]) -> ProbeResult:
        return cached_probe(loaded, ps, cfg["probe"], keep, cfg.get("cache_dir"))

    def measure_result(result: ProbeResult) -> pd.DataFrame:
        return measure(result, cfg["metrics"])

    settings = ProbeSettings.from_config(cfg["probe"])
    out = intervene.run_direction(spec, loaded, prompt_set, probe, measure_result, settings)
    report = _report(out["base_eval"], out["eval_set"], cfg["metrics"])
    intervene.write_steering_data(out, job_dir)
    plots = intervene.plot_steering(out, job_dir, title) if cfg["output"].get("plots") else {}
    meta = out["direction"].meta
    extra = {"intervention": "direction", "etas": out["etas"],
             "intervention_layers": list(meta.get("intervention_layers") or []),
             "eta_scale": meta.get("eta_scale"), "position": meta.get("position"),
             "n_calibration": int(len(out["cal_idx"])), "n_evaluation": int(len(out["eval_idx"])),
             "direction": {k: meta.get(k) for k in ("method", "layers", "raw_norm", "dataset",
                                                    "cross_model_transfer", "cosine_to_direction")},
             "steering": intervene.steering_summary(out["steering"])}
    table = out["steering"]
    for eta in out["etas"]:
        tracker.log_layers(table[table["eta"] == eta].drop(columns="eta"), prefix=f"steered/eta={eta:g}/")
    tracker.log_table("steering", out["steering"])
    tracker.log_artifact(f"direction-{loaded.name}-{cfg['dataset']['name']}", "direction",
                         [job_dir / "direction.safetensors", job_dir / "direction.json"], meta)
    return report, extra, plots


def _ablation(spec: JobSpec, loaded: LoadedModel, prompt_set: PromptSet, job_dir: Path,
              title: str, tracker: Tracker) -> tuple[ProbeReport, dict[str, Any], dict[str, Path]]:
    """Null-space truncation or direction ablation; the report covers the evaluation split."""
    cfg = spec.config
    out = ablate.run_ablation(spec, loaded, prompt_set,
                              lambda ps, keep: cached_probe(loaded, ps, cfg["probe"], keep,
                                                            cfg.get("cache_dir")),
                              lambda result: measure(result, cfg["metrics"]),
                              ProbeSettings.from_config(cfg["probe"]))
    report = _report(out["base_eval"], out["eval_set"], cfg["metrics"])
    plots = ablate.write_ablation(out, job_dir, title, bool(cfg["output"].get("plots")))
    extra = {"intervention": spec.study, "n_calibration": int(len(out["fit"].cal_idx)),
             "n_evaluation": int(len(out["fit"].eval_idx)), "ablation": out["report"]}
    table = out["table"]
    for variant in table["variant"].unique():
        tracker.log_layers(table[table["variant"] == variant].drop(columns="variant"),
                           prefix=f"ablation/{variant}/")
    tracker.log_table("ablation", table)
    per_layer = out["fit"].per_layer
    series = {"norm": {l: float(np.linalg.norm(v)) for l, v in per_layer.items()}}
    if out["report"].get("rho_per_layer"):
        series["rho"] = {int(l): float(v) for l, v in out["report"]["rho_per_layer"].items()}
    if per_layer:
        tracker.log_series("nullspace" if spec.study == "nullspace" else "direction", series)
    return report, extra, plots


def _flat_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    flat = {f"final/{k}": v for k, v in summary["final"].items()}
    for key in ("plateau_layer", "peak_ece_layer", "peak_ece", "emergence_layer", "n_examples"):
        flat[key] = summary.get(key)  # the same keys in every run; None when there is no peak
    for eta, values in summary.get("steering", {}).items():
        for metric in ("delta_ece", "delta_mce", "delta_accuracy", "changed"):
            flat[f"steering/eta={eta}/{metric}"] = values[metric]
    if summary.get("direction"):
        flat["direction/raw_norm"] = summary["direction"].get("raw_norm")
    if (summary.get("ablation") or {}).get("direction_raw_norm") is not None:
        flat["direction/raw_norm"] = summary["ablation"]["direction_raw_norm"]
    report = summary.get("ablation") or {}
    for key in ("rho", "rho_random_mean", "p_value", "max_cosine", "k"):
        if key in report:
            flat[f"nullspace/{key}"] = report[key]
    for part in ("truncation", "random_control"):
        for metric, value in (report.get(part) or {}).items():
            flat[f"ablation/{part}/{metric}"] = value
    return flat
