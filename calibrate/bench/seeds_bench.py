"""Seeds as an axis: 5 seeds of a last-layer steering job against one seed, side by side (not a test).

``calibrate bench seeds [--model smollm2] [--dataset sst2] [--n N] [--seeds 5] [--rounds 1]``

Each round runs, in one process with the model loaded once (as a sweep does):

* ``one_seed``: one steering job (``seed=0``) from an empty probe cache: its probe, ĉ, the
  null (1,000 random directions at the last layer, matched effect), the paired intervals
  (2,000 replicates at the steered cells), the baselines and what ĉ does, its files;
* ``five_seeds``: the same job for ``seed=0..4`` from another empty probe cache: the first
  probes, the others re-split the cached probe (their prompts are the same: only the split,
  the exemplars — none here —, the random directions and the resamples change).

The job is the adjudication's (``intervention.eta_scale=residual_norm eta=[0,0.02,0.05,0.1]``,
tracker, plots and predictions off: the figures are the same work in every job and not part of
the statistics). A warm-up job on 16 prompts loads the model and the imports first. The probe
cache's entries go to a temporary folder (the model's files stay in the user cache). It prints
the ratio and merges ``seeds_five_over_one`` (target <= 1.3), the median seconds, every round's
seconds, the machine's 1-minute load average before and after, and the settings into
``bench.json`` in the current directory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from calibrate.io.results import merge_json

BENCH_FILE = "bench.json"
JOB = ("probe.progress=false", "tracker=none", "output.predictions=false", "output.plots=false",
       "intervention=steering", "intervention.eta_scale=residual_norm", "eta=[0,0.02,0.05,0.1]")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="calibrate bench seeds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model config name")
    parser.add_argument("--dataset", default="sst2", help="dataset config name")
    parser.add_argument("--n", type=int, default=None, help="dataset.limit (default: all)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", default=BENCH_FILE)
    args = parser.parse_args(argv)
    for name in ("seeds", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.n is not None and args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    return args


@contextmanager
def empty_probe_cache():
    """Probe-cache entries in a fresh temporary folder, and none in memory."""
    from calibrate.engine import cache as probe_cache

    original = probe_cache._path
    with tempfile.TemporaryDirectory(prefix="calibrate-bench-") as tmp:
        probe_cache._MEMORY.clear()
        probe_cache._path = lambda key, cache_dir: Path(tmp) / "probe" / f"{key}.npz"
        try:
            yield Path(tmp)
        finally:
            probe_cache._path = original
            probe_cache._MEMORY.clear()


def _jobs(args: argparse.Namespace, seeds: Sequence[int], extra: Sequence[str] = ()) -> float:
    """Seconds to run the job once per seed into a temporary folder, from an empty cache."""
    from calibrate.api import compose
    from calibrate.config.spec import build_spec
    from calibrate.job import run_job

    limit = [] if args.n is None else [f"dataset.limit={args.n}"]
    with empty_probe_cache() as tmp:
        start = time.perf_counter()
        for seed in seeds:
            spec = build_spec(compose([*JOB, f"model={args.model}", f"dataset={args.dataset}",
                                       *limit, f"seed={seed}", *extra]))
            run_job(spec, tmp / f"job{seed}")
        return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _jobs(args, [0], ["dataset.limit=16"])  # warm-up: the model, the imports
    print(f"bench: {args.seeds} seeds vs 1 of a last-layer steering job, {args.model} on "
          f"{args.n or 'all'} {args.dataset} prompts, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    load = [os.getloadavg()[0]]  # the machine's 1-minute load before and after the rounds
    times: dict[str, list[float]] = {"one_seed": [], "five_seeds": []}
    arms = {"one_seed": [0], "five_seeds": list(range(args.seeds))}
    for round_ in range(args.rounds):
        order = list(arms) if round_ % 2 == 0 else list(reversed(arms))
        for name in order:
            times[name].append(_jobs(args, arms[name]))
            print(f"  round {round_ + 1}/{args.rounds} {name:10s} {times[name][-1]:8.2f} s")
    load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    figures = {"seeds_five_over_one": med["five_seeds"] / med["one_seed"],
               "seeds_one_s": med["one_seed"], "seeds_five_s": med["five_seeds"],
               "seeds_bench": {"model": args.model, "dataset": args.dataset, "n": args.n,
                               "seeds": args.seeds, "rounds": args.rounds,
                               "threads": torch.get_num_threads(), "job": list(JOB),
                               "rounds_s": times, "load_average": load,
                               "cpus": os.cpu_count()}}
    print(f"seeds_five_over_one {figures['seeds_five_over_one']:.3f}  (target <= 1.3)")
    merge_json(Path(args.out), figures)
    return figures


if __name__ == "__main__":
    main()
