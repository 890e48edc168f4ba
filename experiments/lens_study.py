"""The lens study (issue 21): is the confidence correction phase an artefact of the logit lens?

For each model x dataset, every layer of the same evaluated rows (the evaluation half of the
job's seeded split; the calibration half is what the fitted lenses are fit on) is read through
every lens that applies: ``logit``, ``tuned``, ``affine`` and ``probe`` (refused for cloze, as a
job refuses it). By default the tuned and affine lenses are fit once per model on unlabelled text
that no evaluated row is in (``--text truthfulqa``: TruthfulQA's questions and best answers, from
``../shared/data``, written to ``OUT/lens_text.txt``; the lens's ``lens.text_path``), so one fit
serves every dataset; ``--text prompts`` fits them on each job's calibration prompts instead (the
harness's default). Each lens's per-layer table (accuracy and ECE with bootstrap intervals), its
phases (accuracy plateau, ECE peak, correction layers), and what it was fit on with its held-out
KL to the final layer are written to ``OUT/<model>/<dataset>/``; ``OUT/summary.json`` gathers the
phases and the KL at three depths. Run from the repository root::

    python experiments/lens_study.py [--out experiments/lens_study] [--models smollm2 gemma3_270m]
        [--datasets sst2 rotten_tomatoes mmlu arc_easy] [--limit 200] [--threads 1]
        [--text truthfulqa|prompts] [--pairs 240] [--lens lens.steps=40 ...]
    python experiments/lens_study.py --tables | --figures   # from OUT's committed results

Uses the same code a job uses (``calibrate.job.prepare``, ``JobContext.readout``, the probe
scoring and ``measure``); fitted lenses are cached in the calibrate cache, so a rerun is reads only.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import torch

from calibrate.api import compose
from calibrate.config.spec import build_spec
from calibrate.core.phases import emergence_layer, find_phases, phases_to_dict
from calibrate.engine.scoring import score
from calibrate.errors import UserError
from calibrate.job import chance_accuracy, prepare
from calibrate.studies.job_context import JobContext, measure

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {
    "sst2": [],
    "rotten_tomatoes": [f"dataset.local_path={SHARED / 'rotten_tomatoes'}", "dataset.shuffle=true"],
    "mmlu": ["dataset.subjects=[high_school_psychology,high_school_biology,miscellaneous]",
             "dataset.shuffle=true"],
    "arc_easy": ["dataset.shuffle=true"],  # cloze, the dataset's default answer format
}
LENSES = {"logit": [], "tuned": ["lens=tuned"], "affine": ["lens=affine"], "probe": ["lens=probe"]}
AFFINE_KEYS = ("text_path", "max_tokens", "holdout_fraction", "kl_tokens", "max_length", "seed")
COMMON = ["tracker=none", "probe.progress=false", "probe.option_mass=none", "intervention=probe"]


def depths(kl: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """The logit lens's and ``name``'s held-out KL at a quarter, half and three quarters of depth."""
    if not kl:
        return {}
    n = len(kl["layer"])
    return {str(kl["layer"][i]): {"logit": round(kl["logit"][i], 4), name: round(kl[name][i], 4)}
            for i in (n // 4, n // 2, (3 * n) // 4)}


def write_text(out: Path, n_pairs: int, per_paragraph: int = 8) -> Path:
    """The first ``n_pairs`` of TruthfulQA's questions and best answers as plain text,
    ``per_paragraph`` pairs to a paragraph (paragraphs are the training sequences)."""
    with open(SHARED / "truthfulqa" / "TruthfulQA.csv", newline="", encoding="utf-8") as f:
        pairs = [f"{row['Question']} {row['Best Answer']}." for row in csv.DictReader(f)]
    pairs = pairs[:n_pairs]
    text = "\n\n".join(" ".join(pairs[i:i + per_paragraph])
                        for i in range(0, len(pairs), per_paragraph))
    path = out / "lens_text.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def run_one(model: str, dataset: str, limit: int, out: Path, fitted_on: list[str],
            extra: list[str]) -> dict[str, Any]:
    base = [*COMMON, f"model={model}", f"dataset={dataset}", f"dataset.limit={limit}",
            *DATASETS[dataset]]
    first = prepare(build_spec(compose(base)))  # the model, the prompts, the split
    loaded, prompt_set = first.loaded, first.prompt_set
    cal, evaluation = first.split()
    eval_set = prompt_set.subset(evaluation)
    folder = out / model / dataset
    folder.mkdir(parents=True, exist_ok=True)
    found: dict[str, Any] = {"n_rows": len(prompt_set.prompts), "n_calibration": len(cal),
                             "n_evaluated": len(evaluation),
                             "chance_accuracy": chance_accuracy(eval_set), "lenses": {}}
    for lens, overrides in LENSES.items():
        try:
            fit = [*fitted_on, *extra] if lens in ("tuned", "affine") else []
            if lens == "affine":  # the settings the affine lens has
                fit = [o for o in fit if o.split("=")[0].split(".")[-1] in AFFINE_KEYS]
            spec = build_spec(compose([*base, *overrides, *fit]))
        except UserError as err:  # the lens cannot read this job: recorded as refused
            found["lenses"][lens] = {"refused": str(err)}
            print(f"{model} {dataset} {lens}: refused: {err}", flush=True)
            continue
        ctx = JobContext(spec, loaded, prompt_set)
        start = time.perf_counter()
        readout = ctx.readout
        fitted = time.perf_counter() - start
        result = score(loaded, eval_set, spec.probe, readout)
        table = measure(result, spec.metrics)
        phases = find_phases(table, spec.phases)
        table.to_csv(folder / f"layers_{lens}.csv", index=False)
        summary = readout.summary()
        found["lenses"][lens] = {
            **phases_to_dict(phases), "emergence_layer": emergence_layer(
                table, found["chance_accuracy"]),
            "final_accuracy": float(table["accuracy"].iloc[-1]),
            "final_ece": float(table["ece"].iloc[-1]),
            "fit_on": summary.get("fit_on"), "settings": summary.get("settings"),
            "kl_to_final": summary.get("kl_to_final"),
            "kl_at_depths": depths(summary.get("kl_to_final"), lens),
            "identity": summary.get("identity", lens), "fit_s": round(fitted, 1),
            "read_s": round(time.perf_counter() - start - fitted, 1)}
        print(f"{model} {dataset} {lens}: plateau {phases.plateau_layer} peak ECE "
              f"{phases.peak_ece_layer} ({phases.peak_ece}) {phases.kind} "
              f"fit {fitted:.0f}s", flush=True)
    seeds = {"split_seed": first.spec.direction.seed, "calibration_fraction":
             first.spec.direction.calibration_fraction, "bootstrap": first.spec.metrics.bootstrap,
             "bootstrap_seed": first.spec.metrics.seed, "dataset_seed": first.spec.dataset.seed}
    found["seeds"] = seeds
    (folder / "lenses.json").write_text(json.dumps(found, indent=1, default=str))
    return found


def tables(out: Path) -> str:
    """The study's markdown tables from ``OUT/summary.json`` and the per-lens layer tables."""
    import pandas as pd

    summary = json.loads((out / "summary.json").read_text())
    header = ("| model | dataset | lens | n | final acc [95% CI] | final ECE [95% CI] | "
              "best acc (layer) | max ECE [95% CI] (layer) | plateau | ECE peak | correction | "
              "phase |")
    lines = [header, "|---|---|---|---:|---|---|---|---|---:|---:|---|---|"]
    kl_lines = ["| model | dataset | lens | KL logit → lens at 1/4, 1/2, 3/4 depth (layer: nats) |",
                "|---|---|---|---|"]
    for job, found in summary.items():
        model, dataset = job.split("/")
        for lens, got in found["lenses"].items():
            if "refused" in got:
                lines.append(f"| {model} | {dataset} | {lens} | — | refused: "
                             f"{got['refused'].split(';')[0]} | | | | | | | |")
                continue
            t = pd.read_csv(out / model / dataset / f"layers_{lens}.csv")
            last, top = t.iloc[-1], t.iloc[int(t["ece"].to_numpy().argmax())]
            best = t.iloc[int(t["accuracy"].to_numpy().argmax())]
            lines.append(
                f"| {model} | {dataset} | {lens} | {found['n_evaluated']} | {last['accuracy']:.3f} "
                f"[{last['accuracy_lo']:.2f}, {last['accuracy_hi']:.2f}] | {last['ece']:.3f} "
                f"[{last['ece_lo']:.2f}, {last['ece_hi']:.2f}] | {best['accuracy']:.3f} "
                f"({int(best['layer'])}) | {top['ece']:.3f} [{top['ece_lo']:.2f}, "
                f"{top['ece_hi']:.2f}] ({int(top['layer'])}) | {got['plateau_layer']} | "
                f"{got['peak_ece_layer'] if got['peak_ece_layer'] is not None else '—'} | "
                f"{', '.join(map(str, got['correction_layers'])) or '—'} | {got['phase_kind']} |")
            if got.get("kl_at_depths"):
                kl_lines.append(f"| {model} | {dataset} | {lens} | " + "; ".join(
                    f"{layer}: {v['logit']:.2f} → {v[lens]:.2f}"
                    for layer, v in got["kl_at_depths"].items()) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(kl_lines) + "\n"


def figures(out: Path) -> list[Path]:
    """One PNG per model x dataset in ``OUT/<model>/<dataset>/layers.png``: accuracy and ECE per
    layer under every lens that read it, with the 95% bootstrap intervals as bands."""
    import matplotlib.pyplot as plt
    import pandas as pd

    written = []
    for folder in sorted(p for p in out.glob("*/*") if list(p.glob("layers_*.csv"))):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
        for lens in LENSES:
            path = folder / f"layers_{lens}.csv"
            if not path.exists():
                continue
            t = pd.read_csv(path)
            for ax, metric in zip(axes, ("accuracy", "ece")):
                line, = ax.plot(t["layer"], t[metric], marker=".", label=lens)
                ax.fill_between(t["layer"], t[f"{metric}_lo"], t[f"{metric}_hi"], alpha=0.15,
                                color=line.get_color())
        for ax, metric in zip(axes, ("accuracy", "ECE")):
            ax.set_xlabel("layer")
            ax.set_ylabel(metric)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{folder.parent.name} × {folder.name}: every layer under every lens "
                     "(95% bootstrap bands)", fontsize=10)
        fig.tight_layout()
        fig.savefig(folder / "layers.png", dpi=90)
        plt.close(fig)
        written.append(folder / "layers.png")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/lens_study")
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3_270m"])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--text", choices=("truthfulqa", "prompts"), default="truthfulqa")
    parser.add_argument("--pairs", type=int, default=240,
                        help="--text truthfulqa: question-answer pairs of the text (of 817)")
    parser.add_argument("--lens", nargs="*", default=[], help="tuned-lens settings (key=value)")
    parser.add_argument("--tables", action="store_true", help="print OUT's tables and stop")
    parser.add_argument("--figures", action="store_true",
                        help="write OUT/<model>/<dataset>/layers.png and stop")
    args = parser.parse_args()
    if args.tables:
        print(tables(Path(args.out)))
        return
    if args.figures:
        for path in figures(Path(args.out)):
            print(path)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    fitted_on = ([f"lens.text_path={write_text(out, args.pairs).resolve()}"]
                 if args.text == "truthfulqa"
                 else [])
    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    for model in args.models:
        for dataset in args.datasets:
            found = run_one(model, dataset, args.limit, out, fitted_on, args.lens)
            summary[f"{model}/{dataset}"] = {
                k: v for k, v in found.items() if k != "lenses"} | {"lenses": {
                    lens: {k: v for k, v in got.items() if k not in ("kl_to_final", "settings")}
                    for lens, got in found["lenses"].items()}}
            summary_file.write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
