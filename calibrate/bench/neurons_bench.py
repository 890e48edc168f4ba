"""The neurons study against one probe of the same prompts, side by side (not a test).

``calibrate bench neurons [--model smollm2] [--dataset sst2] [--n 64] [--rounds 3]``

On the same ``--n`` prompts (a seeded shuffle), interleaved round by round (only ratios measured
together count on these noisy machines), it times:

* ``probe``: one layer-wise probe of the prompts (every layer through the lens);
* ``neurons_last``: the whole ``intervention=neurons`` study with its defaults on the last block
  (weight statistics, the pass that is the probe and captures the activations, ĉ, the top
  candidates, the top set and ``intervention.n_null`` matched random neurons of each, total and
  direct effect, paired intervals): every arm edits the last residual by a known vector, so no
  arm runs a forward pass;
* ``neurons_last3``: the same over the last three blocks (``intervention.blocks=3``): arms whose
  lowest block is below the last run only the blocks above it, on the key/value cache.

``--n-null`` (the study's ``intervention.n_null``) and ``--top-k`` are passed through; every other
setting is the study's default (the null space and its cache included: the first round fills it,
as a job's first run does, and the medians are reported). It prints the ratios and merges
``neurons_last_over_probe`` (target <= 1.5), ``neurons_last3_over_probe`` (target <= 3), the
seconds (the probe's as ``neurons_bench_probe_s``) and the settings into ``bench.json`` in the
current directory.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from calibrate.bench.rounds import median_seconds
from calibrate.errors import ConfigError
from calibrate.io.results import merge_json

BENCH_FILE = "bench.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="calibrate bench neurons", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model config name")
    parser.add_argument("--dataset", default="sst2", help="dataset config name")
    parser.add_argument("--n", type=int, default=64, help="prompts (half calibrate, half evaluate)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=8, help="intervention.top_k")
    parser.add_argument("--n-null", type=int, default=100, help="intervention.n_null")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--output", "--out", dest="out", default=BENCH_FILE)
    args = parser.parse_args(argv)
    for name, least in (("n", 2), ("rounds", 1), ("top_k", 1), ("n_null", 0)):
        if getattr(args, name) < least:  # before the model loads
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)}; accepted: an "
                              f"integer >= {least}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from calibrate.api import compose
    from calibrate.bench.probe_bench import load_inputs
    from calibrate.config.spec import build_spec
    from calibrate.engine.scoring import score
    from calibrate.studies import get_study
    from calibrate.studies.job_context import JobContext

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded, prompt_set, settings, _ = load_inputs(args.model, args.dataset, args.n)
    cache = tempfile.mkdtemp(prefix="calibrate-bench-neurons-")
    study = get_study("neurons")

    def spec(blocks: int):
        return build_spec(compose([
            f"model={args.model}", f"dataset={args.dataset}", "tracker=none",
            "probe.progress=false", f"cache_dir={cache}", "intervention=neurons",
            f"intervention.blocks={blocks}", f"intervention.top_k={args.top_k}",
            f"intervention.n_null={args.n_null}"]))

    specs = {"neurons_last": spec(1), "neurons_last3": spec(3)}
    summaries: dict[str, Any] = {}

    def job(name: str):
        def run() -> None:  # a fresh context per run: nothing carried over but the null space
            out = study.run(JobContext(specs[name], loaded, prompt_set))
            summaries[name] = {**out.report_json["candidates"][0],
                               "n_arms": out.report_json["n_arms"]}
        return run

    variants = {"probe": lambda: score(loaded, prompt_set, settings),
                "neurons_last": job("neurons_last"), "neurons_last3": job("neurons_last3")}
    print(f"bench: neurons study vs probe, {args.model} on {args.n} {args.dataset} prompts, "
          f"top_k {args.top_k}, n_null {args.n_null}, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    med = median_seconds(variants, args.rounds, 14)
    figures = {
        "neurons_last_over_probe": med["neurons_last"] / med["probe"],
        "neurons_last3_over_probe": med["neurons_last3"] / med["probe"],
        **{f"neurons_bench_{k}_s" if k == "probe" else f"{k}_s": v for k, v in med.items()},
        "neurons_bench": {"model": args.model, "dataset": args.dataset, "n": args.n,
                          "rounds": args.rounds, "threads": torch.get_num_threads(),
                          "top_k": args.top_k, "n_null": args.n_null,
                          "arms_last": summaries.get("neurons_last", {}).get("n_arms"),
                          "top_candidate": summaries.get("neurons_last", {}).get("arm")},
    }
    print(f"neurons_last_over_probe  {figures['neurons_last_over_probe']:.3f}  (target <= 1.5)")
    print(f"neurons_last3_over_probe {figures['neurons_last3_over_probe']:.3f}  (target <= 3)")
    merge_json(Path(args.out), figures)
    return figures


if __name__ == "__main__":
    main()
