"""Shared-prefix reuse, timed side by side in one run (not a test).

``python -m calibrate.bench prefix [--model smollm2] [--subjects a b] [--n 0] [--shots 5]``

On the same MMLU test questions (the first ``n`` of each subject; 0: all of them, as a job
runs a subject: the shared prefix is paid once per subject, so few questions per subject
cannot amortize it) it times, interleaved round by
round (only ratios measured together count on a noisy machine):

* ``zero_shot``: the layer-wise probe of the zero-shot prompts;
* ``shots_reuse``: the k-shot prompts, each subject's exemplar prefix run once and its key/value
  cache expanded across the batch of questions (:mod:`calibrate.engine.prefix`);
* ``shots_recompute``: the same k-shot prompts run whole (``probe.prefix_reuse=false``).

It prints ``shots_reuse_over_zero_shot`` (target <= 1.3), ``shots_recompute_over_zero_shot``
(the cost reuse avoids), the largest probability difference between the two k-shot runs, and
merges them into ``bench.json`` under ``prefix_*`` keys.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibrate.engine.probe import ProbeSettings, run_probe

BENCH_FILE = "bench.json"
DEFAULT_SUBJECTS = ("high_school_geography",)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m calibrate.bench prefix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model config name")
    parser.add_argument("--subjects", nargs="+", default=list(DEFAULT_SUBJECTS))
    parser.add_argument("--n", type=int, default=0,
                        help="questions per subject (0: all; the prefix is paid once per subject)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--output", type=Path, default=Path(BENCH_FILE))
    args = parser.parse_args(argv)
    if args.n < 0:
        parser.error(f"--n must be >= 0, got {args.n}")
    for name in ("rounds", "shots"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def setup(model: str, subjects: Sequence[str], n: int, shots: int):
    """The model and the zero-shot and k-shot prompt sets of the same questions."""
    from omegaconf import OmegaConf

    import calibrate
    from calibrate.api import compose
    from calibrate.tasks.prompts import build_prompts
    from calibrate.tasks.shots import PromptStyle, load_with_exemplars

    cfg = OmegaConf.to_container(compose([f"model={model}", "dataset=mmlu",
                                          f"dataset.subjects=[{','.join(subjects)}]"]),
                                 resolve=True)
    loaded = calibrate.load_model(model)
    records, exemplars = load_with_exemplars(cfg["dataset"], PromptStyle(shots))
    by_subject: dict[str, list[Any]] = {}
    for record in records:
        by_subject.setdefault(record.subject, []).append(record)
    records = [r for rows in by_subject.values() for r in (rows[:n] if n else rows)]
    zero = build_prompts(records, cfg["dataset"], loaded.tokenizer, style=PromptStyle(0))
    many = build_prompts(records, cfg["dataset"], loaded.tokenizer, style=PromptStyle(shots),
                         exemplars=exemplars)
    settings = ProbeSettings.from_config({**cfg["probe"], "progress": False})
    return loaded, zero, many, settings


def measure(loaded, zero, many, settings: ProbeSettings, rounds: int) -> dict[str, Any]:
    """Median seconds of each variant over interleaved rounds, and the ratios."""
    from dataclasses import replace

    variants = {"zero_shot": (zero, settings),
                "shots_reuse": (many, replace(settings, prefix_reuse=True)),
                "shots_recompute": (many, replace(settings, prefix_reuse=False))}
    times: dict[str, list[float]] = {name: [] for name in variants}
    results: dict[str, Any] = {}
    run_probe(loaded, zero, settings)  # warm-up (allocator, kernels)
    for _ in range(rounds):
        for name, (prompt_set, chosen) in variants.items():
            start = time.perf_counter()
            results[name] = run_probe(loaded, prompt_set, chosen)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    tokens = loaded.tokenizer(many.prompts)["input_ids"]
    return {
        "prefix_zero_shot_s": med["zero_shot"], "prefix_shots_reuse_s": med["shots_reuse"],
        "prefix_shots_recompute_s": med["shots_recompute"],
        "prefix_shots_reuse_over_zero_shot": med["shots_reuse"] / med["zero_shot"],
        "prefix_shots_recompute_over_zero_shot": med["shots_recompute"] / med["zero_shot"],
        "prefix_recompute_over_reuse": med["shots_recompute"] / med["shots_reuse"],
        "prefix_max_prob_diff": float(np.abs(results["shots_reuse"].probs
                                             - results["shots_recompute"].probs).max()),
        "prefix_mean_prompt_tokens": {
            "zero_shot": float(np.mean([len(t) for t in
                                        loaded.tokenizer(zero.prompts)["input_ids"]])),
            "shots": float(np.mean([len(t) for t in tokens]))},
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and merge its figures into bench.json."""
    from calibrate.io.results import merge_json

    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    loaded, zero, many, settings = setup(args.model, args.subjects, args.n, args.shots)
    print(f"prefix bench: {args.model}, {len(zero.prompts)} MMLU questions "
          f"({', '.join(args.subjects)}), {args.shots} shots, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, device {loaded.device}")
    figures = measure(loaded, zero, many, settings, args.rounds)
    figures["prefix_bench"] = {"model": args.model, "subjects": list(args.subjects), "n": args.n,
                               "shots": args.shots, "rounds": args.rounds,
                               "threads": torch.get_num_threads(),
                               "device": str(loaded.device)}
    merge_json(args.output, figures)
    tokens = figures["prefix_mean_prompt_tokens"]
    print(f"mean prompt tokens: zero-shot {tokens['zero_shot']:.0f}, {args.shots}-shot "
          f"{tokens['shots']:.0f}")
    print(f"{args.shots}-shot with reuse / zero-shot   = "
          f"{figures['prefix_shots_reuse_over_zero_shot']:.3f}   (target <= 1.3)")
    print(f"{args.shots}-shot recomputed / zero-shot   = "
          f"{figures['prefix_shots_recompute_over_zero_shot']:.3f}")
    print(f"recomputed / reuse                = {figures['prefix_recompute_over_reuse']:.2f}")
    print(f"max |probability difference|      = {figures['prefix_max_prob_diff']:.2e}")
    print(f"written to {args.output}")
    return figures


if __name__ == "__main__":
    main()
