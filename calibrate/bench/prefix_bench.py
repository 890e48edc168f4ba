"""Shared-prefix reuse, timed side by side in one run (not a test).

``calibrate bench prefix [--model smollm2] [--subjects a b] [--n 0] [--shots 5]
[--kinds probe steer cloze] [--cloze-n 60]``

Three kinds of work, each on the same questions zero-shot and k-shot, timed interleaved round by
round (only ratios measured together count on a noisy machine):

* ``probe``: the layer-wise letter probe of MMLU test questions (the first ``n`` of each subject;
  0: all of them, as a job runs a subject: the shared prefix is paid once per subject, so few
  questions per subject cannot amortize it);
* ``steer``: 8 etas of a unit direction added at the block before last on the same questions
  (the upper blocks run per eta after each question's cache);
* ``cloze``: ARC-Easy scored as continuations at every layer (``cloze_n`` questions; exemplars
  sampled from the rows not evaluated, one prefix for all).

Each kind has three variants: ``zero_shot``; ``shots_reuse``: the k-shot prompts, the exemplar
prefix run once per group and its key/value cache expanded across each batch
(:mod:`calibrate.engine.prefix`); ``shots_recompute``: the same k-shot prompts run whole
(``probe.prefix_reuse=false``). It prints per kind ``reuse / zero-shot`` (the probe's target:
<= 1.3), ``recompute / zero-shot`` (the cost reuse avoids) and the largest difference between
the two k-shot runs, and merges them into ``bench.json`` under ``prefix_<kind>_*`` keys.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCH_FILE = "bench.json"
DEFAULT_SUBJECTS = ("high_school_geography",)
KINDS = ("probe", "steer", "cloze")
VARIANTS = ("zero_shot", "shots_reuse", "shots_recompute")
N_ETAS = 8


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="calibrate bench prefix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model config name")
    parser.add_argument("--subjects", nargs="+", default=list(DEFAULT_SUBJECTS))
    parser.add_argument("--n", type=int, default=0,
                        help="questions per subject (0: all; the prefix is paid once per subject)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--cloze-n", type=int, default=60, help="ARC-Easy questions (cloze)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--output", type=Path, default=Path(BENCH_FILE))
    args = parser.parse_args(argv)
    if args.n < 0:
        parser.error(f"--n must be >= 0, got {args.n}")
    for name in ("rounds", "shots", "cloze_n"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _prompt_sets(loaded, dataset_cfg: Any, shots: int, pick: Callable[[list], list]):
    """The zero-shot and k-shot prompt sets of the same records."""
    from calibrate.tasks.prompts import build_prompts
    from calibrate.tasks.shots import PromptStyle, load_with_exemplars

    records, exemplars = load_with_exemplars(dataset_cfg, PromptStyle(shots))
    records = pick(records)
    zero = build_prompts(records, dataset_cfg, loaded.tokenizer, style=PromptStyle(0))
    many = build_prompts(records, dataset_cfg, loaded.tokenizer, style=PromptStyle(shots),
                         exemplars=exemplars)
    return zero, many


def setup(args: argparse.Namespace):
    """The model, the probe settings and, per kind, its three variants as callables."""
    import calibrate
    from calibrate.api import typed_config
    from calibrate.engine.edits import Steering
    from calibrate.engine.scoring import score, score_steered

    def config(*overrides: str):
        return typed_config([f"model={args.model}", *overrides])

    mmlu = config("dataset=mmlu", f"dataset.subjects=[{','.join(args.subjects)}]")
    loaded = calibrate.load_model(args.model)
    settings = replace(mmlu.probe, progress=False)
    reuse, recompute = replace(settings, prefix_reuse=True), replace(settings, prefix_reuse=False)

    def per_subject(records: list) -> list:
        by_subject: dict[str, list[Any]] = {}
        for record in records:
            by_subject.setdefault(record.subject, []).append(record)
        return [r for rows in by_subject.values() for r in (rows[:args.n] if args.n else rows)]

    cases: dict[str, dict[str, Callable[[], np.ndarray]]] = {}
    sizes: dict[str, Any] = {}
    if "probe" in args.kinds or "steer" in args.kinds:
        zero, many = _prompt_sets(loaded, mmlu.dataset, args.shots, per_subject)
        sizes["mmlu"] = _sizes(loaded, zero, many)
        if "probe" in args.kinds:
            cases["probe"] = {
                "zero_shot": lambda: score(loaded, zero, settings).probs,
                "shots_reuse": lambda: score(loaded, many, reuse).probs,
                "shots_recompute": lambda: score(loaded, many, recompute).probs}
        if "steer" in args.kinds:
            hidden = loaded.adapter.unembed_weight.shape[1]
            unit = np.random.default_rng(0).standard_normal(hidden)
            steering = Steering(unit / np.linalg.norm(unit), (loaded.adapter.num_blocks - 1,),
                                tuple(np.linspace(0.0, 8.0, N_ETAS)))
            cases["steer"] = {
                "zero_shot": lambda: score_steered(loaded, zero, steering, settings),
                "shots_reuse": lambda: score_steered(loaded, many, steering, reuse),
                "shots_recompute": lambda: score_steered(loaded, many, steering, recompute)}
    if "cloze" in args.kinds:
        arc = config("dataset=arc_easy", f"dataset.limit={args.cloze_n}", "dataset.shuffle=true")
        czero, cmany = _prompt_sets(loaded, arc.dataset, args.shots, lambda r: r)
        sizes["arc_easy"] = _sizes(loaded, czero, cmany)
        cases["cloze"] = {
            "zero_shot": lambda: score(loaded, czero, settings).option_logits,
            "shots_reuse": lambda: score(loaded, cmany, reuse).option_logits,
            "shots_recompute": lambda: score(loaded, cmany, recompute).option_logits}
    return loaded, cases, sizes


def _sizes(loaded, zero, many) -> dict[str, float]:
    tokens = {name: loaded.tokenizer(ps.prompts)["input_ids"] for name, ps in
              (("zero_shot", zero), ("shots", many))}
    return {"questions": len(zero.prompts),
            **{f"mean_tokens_{name}": float(np.mean([len(t) for t in ids]))
               for name, ids in tokens.items()}}


def measure(cases: dict[str, dict[str, Callable[[], np.ndarray]]], rounds: int) -> dict[str, Any]:
    """Median seconds of each kind's variants over interleaved rounds, the ratios and the largest
    difference between the k-shot runs with and without reuse."""
    times = {(kind, v): [] for kind, variants in cases.items() for v in variants}
    results: dict[tuple[str, str], np.ndarray] = {}
    for variants in cases.values():
        variants["zero_shot"]()  # warm-up (allocator, kernels)
    for _ in range(rounds):
        for kind, variants in cases.items():
            for name, call in variants.items():
                start = time.perf_counter()
                results[kind, name] = call()
                times[kind, name].append(time.perf_counter() - start)
    figures: dict[str, Any] = {}
    for kind in cases:
        med = {v: statistics.median(times[kind, v]) for v in VARIANTS}
        a, b = results[kind, "shots_reuse"], results[kind, "shots_recompute"]
        if not (np.isfinite(a) == np.isfinite(b)).all():
            raise RuntimeError(f"{kind}: reuse and recompute disagree on which options exist")
        finite = np.isfinite(a)
        figures.update({
            **{f"prefix_{kind}_{v}_s": med[v] for v in VARIANTS},
            f"prefix_{kind}_reuse_over_zero_shot": med["shots_reuse"] / med["zero_shot"],
            f"prefix_{kind}_recompute_over_zero_shot": med["shots_recompute"] / med["zero_shot"],
            f"prefix_{kind}_recompute_over_reuse": med["shots_recompute"] / med["shots_reuse"],
            f"prefix_{kind}_max_abs_diff": float(np.abs(a[finite] - b[finite]).max()),
        })
    return figures


WHAT = {"probe": "probabilities", "steer": "option logits", "cloze": "log-likelihoods"}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and merge its figures into bench.json."""
    from calibrate.io.results import merge_json

    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    loaded, cases, sizes = setup(args)
    print(f"prefix bench: {args.model}, {args.shots} shots, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, device {loaded.device}; kinds {', '.join(cases)}")
    for name, size in sizes.items():
        print(f"  {name}: {size['questions']} questions, mean prompt tokens zero-shot "
              f"{size['mean_tokens_zero_shot']:.0f}, {args.shots}-shot {size['mean_tokens_shots']:.0f}")
    figures = measure(cases, args.rounds)
    figures["prefix_bench"] = {"model": args.model, "subjects": list(args.subjects), "n": args.n,
                               "cloze_n": args.cloze_n, "shots": args.shots,
                               "rounds": args.rounds, "threads": torch.get_num_threads(),
                               "device": str(loaded.device), "sizes": sizes,
                               "steer_etas": N_ETAS}
    merge_json(args.output, figures)
    for kind in cases:
        target = "   (target <= 1.3)" if kind == "probe" else ""
        print(f"{kind:>5}: {args.shots}-shot reuse / zero-shot = "
              f"{figures[f'prefix_{kind}_reuse_over_zero_shot']:.3f}{target}; recomputed / "
              f"zero-shot = {figures[f'prefix_{kind}_recompute_over_zero_shot']:.3f}; "
              f"recomputed / reuse = {figures[f'prefix_{kind}_recompute_over_reuse']:.2f}; "
              f"max |{WHAT[kind]} difference| = {figures[f'prefix_{kind}_max_abs_diff']:.2e}")
    print(f"written to {args.output}")
    return figures


if __name__ == "__main__":
    main()
