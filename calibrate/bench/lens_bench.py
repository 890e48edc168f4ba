"""Fitted lenses against the logit-lens probe, side by side (not a test).

``calibrate bench lens [--model smollm2] [--dataset sst2] [--rounds 3] [--fit-rounds 1]``

On the calibration split of the job's seeded split (SST-2: 436 of its 872 sentences, the
prompts a job's lens trains on), interleaved round by round (only ratios measured together count
on these noisy machines), it times:

* ``probe``: one layer-wise probe of those prompts through the logit lens;
* ``tuned_read``: the same probe read through a trained tuned lens (every layer below the last
  through its translator);
* ``tuned_fit``: training the tuned lens on those prompts from nothing (an empty cache), with the
  default ``lens=tuned`` settings: the residuals of every position, the training steps and the
  held-out KL report (its share is recorded: ``tuned_fit_seconds``);
* ``affine_fit``: the ridge fit of ``lens=affine`` on the same tokens, likewise.

``--fits`` picks the fits (default both). Fits run in the first ``--fit-rounds`` rounds, reads
in every round; each ratio is the median over rounds of the variant's seconds over the same
round's probe. It prints the ratios and merges ``tuned_read_over_probe`` (target <= 1.2),
``tuned_fit_over_probe`` (target <= 10), ``affine_fit_over_probe`` (target <= 1.5), the same
for each fit without its held-out KL report (``*_fit_only_over_probe``: the fit proper; the
report is an evaluation of the fit, on held-out sequences, that every fitted lens writes), the
seconds, each fit's breakdown and the held-out KL of the lenses at three depths into
``bench.json`` in the current directory.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from calibrate.io.results import merge_json

BENCH_FILE = "bench.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="calibrate bench lens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model config name")
    parser.add_argument("--dataset", default="sst2", help="dataset config name")
    parser.add_argument("--limit", type=int, default=None,
                        help="rows of the dataset before the split (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the probe and the read")
    parser.add_argument("--fit-rounds", type=int, default=1, help="rounds that also fit")
    parser.add_argument("--fits", default="affine,tuned",
                        help="the fits timed, comma-separated (affine, tuned; the tuned read "
                             "needs the tuned fit)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--output", "--out", dest="output", default=BENCH_FILE,
                        help="the bench file figures are merged into")
    parser.add_argument("lens_overrides", nargs="*", default=[],
                        help="lens settings for both fits, e.g. lens.steps=20 (key=value)")
    args = parser.parse_args(argv)
    for name in ("rounds", "fit_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.fit_rounds > args.rounds:
        parser.error(f"--fit-rounds {args.fit_rounds} exceeds --rounds {args.rounds}")
    fits = [f.strip() for f in args.fits.split(",") if f.strip()]
    if not fits or set(fits) - {"affine", "tuned"}:
        parser.error(f"--fits {args.fits!r}: accepted: affine, tuned or both, comma-separated")
    args.fits = fits
    return args


def setup(model: str, dataset: str, limit: int | None, overrides: Sequence[str]):
    """Model, the calibration split's prompts, probe settings and both lenses' settings."""
    import calibrate
    from calibrate.api import typed_config
    from calibrate.core.direction import split_indices
    from calibrate.tasks.prompts import build_prompts

    base = [f"model={model}", f"dataset={dataset}", "probe.progress=false"]
    if limit is not None:
        base.append(f"dataset.limit={limit}")
    cfg = typed_config(base)
    records = calibrate.load_dataset(dataset, limit=limit)
    loaded = calibrate.load_model(model)
    prompt_set = build_prompts(records, cfg.dataset, loaded.tokenizer)
    cal, _ = split_indices(len(prompt_set.prompts), cfg.direction.calibration_fraction,
                           cfg.direction.seed)
    tuned = typed_config([*base, "lens=tuned", *overrides]).lens
    affine = typed_config([*base, "lens=affine",
                           *[o for o in overrides if o.split("=")[0].split(".")[-1] in
                             ("max_tokens", "holdout_fraction", "kl_tokens", "seed")]]).lens
    split = {"split": "calibration", "dataset": dataset, "rows": len(cal)}
    return loaded, prompt_set.subset(cal), cfg, tuned, affine, split


def depths(kl: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """KL of the logit lens and of ``name`` at a quarter, half and three quarters of the depth."""
    if not kl:
        return {}
    n = len(kl["layer"])
    return {str(kl["layer"][i]): {"logit": kl["logit"][i], name: kl[name][i]}
            for i in (n // 4, n // 2, (3 * n) // 4)}


def ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """``<variant>_over_probe``: the median over rounds of the variant's seconds over the probe's
    of the same round (round i of each list; a fit runs in the first rounds only), so a change of
    the machine's load between rounds does not enter a ratio."""
    probe = times["probe"]
    return {f"{name}_over_probe": statistics.median(t / p for t, p in zip(times[name], probe))
            for name in ("tuned_read", "tuned_fit", "affine_fit", "tuned_fit_only",
                         "affine_fit_only") if times.get(name)}


def fit_only(seconds: dict[str, float]) -> float:
    """A fit's seconds without its held-out KL report (the evaluation every fitted lens also
    writes): the affine lens's residual pass, sums and solve; the tuned lens's residuals and
    training."""
    return sum(v for k, v in seconds.items() if k != "kl_report")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from calibrate.engine.scoring import score
    from calibrate.readouts import ReadoutSource, build_readout

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded, cal, cfg, tuned_settings, affine_settings, split = setup(
        args.model, args.dataset, args.limit, args.lens_overrides)
    settings = cfg.probe
    seed = cfg.seed
    fitted: dict[str, Any] = {}

    def fit(name: str, lens_settings: Any):
        def run():
            with tempfile.TemporaryDirectory() as empty:  # nothing cached: a real fit
                fitted[name] = build_readout(lens_settings, ReadoutSource(
                    loaded, cal, empty, seed, split))
        return run

    score(loaded, cal, settings)  # warm-up
    print(f"bench: lenses vs probe, {args.model} on {len(cal.prompts)} {args.dataset} "
          f"calibration prompts, {args.rounds} rounds ({args.fit_rounds} with fits), "
          f"{torch.get_num_threads()} threads")
    times: dict[str, list[float]] = {"probe": [], "tuned_read": [], "affine_fit": [],
                                     "tuned_fit": []}
    for round_ in range(args.rounds):
        variants = {"probe": lambda: score(loaded, cal, settings)}
        if round_ < args.fit_rounds:
            if "affine" in args.fits:
                variants["affine_fit"] = fit("affine", affine_settings)
            if "tuned" in args.fits:
                variants["tuned_fit"] = fit("tuned", tuned_settings)
        if "tuned" in fitted or "tuned_fit" in variants:
            variants["tuned_read"] = lambda: score(loaded, cal, settings, fitted["tuned"])
        order = ["probe", "affine_fit", "tuned_fit", "tuned_read"]
        for name in [n for n in order if n in variants]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
            print(f"  round {round_ + 1}/{args.rounds} {name:12s} {times[name][-1]:8.2f} s")
            if name.endswith("_fit"):
                kind = name[:-len("_fit")]
                times.setdefault(f"{name}_only", []).append(
                    fit_only(fitted[kind].summary()["fit_seconds"]))
    med = {k: statistics.median(v) for k, v in times.items() if v}
    summaries = {name: fitted[name].summary() for name in args.fits}
    figures = {
        **ratios(times),
        **{f"{k}_s": v for k, v in med.items()}, "rounds_s": times,
        **{f"{name}_fit_seconds": summary["fit_seconds"] for name, summary in summaries.items()},
        "kl_at_depths": {name: depths(summary["kl_to_final"], name)
                         for name, summary in summaries.items()},
        "lens_bench": {"model": args.model, "dataset": args.dataset,
                       "n_calibration": len(cal.prompts), "rounds": args.rounds,
                       "fit_rounds": args.fit_rounds, "fits": args.fits,
                       "threads": torch.get_num_threads(),
                       **{f"{name}_settings": summary["settings"]
                          for name, summary in summaries.items()}},
    }
    if "tuned" in summaries:
        figures["tuned_fit_tokens"] = summaries["tuned"]["fit_on"]["fit_tokens"]
    targets = {"tuned_read": 1.2, "tuned_fit": 10, "affine_fit": 1.5, "tuned_fit_only": 10,
               "affine_fit_only": 1.5}
    for name, target in targets.items():
        if f"{name}_over_probe" in figures:
            breakdown = summaries.get(name.split("_")[0], {}).get("fit_seconds", "")
            print(f"{name + '_over_probe':27s} {figures[name + '_over_probe']:.3f}  "
                  f"(target <= {target})  {breakdown if name.endswith('fit') else ''}")
    merge_json(Path(args.output), figures)
    return figures


if __name__ == "__main__":
    main()
