"""Speed and memory of the probe, measured side by side in one run (not a test).

``calibrate bench probe [--model smollm2] [--dataset mmlu] [--n 8] [--rounds 3]``

On the same prompts and the same batches it times, interleaved round by round (these machines
are noisy, so only ratios measured together count):

* ``forward``: a plain forward pass of the model (``model(...)``, logits at every position), and
  ``forward_last``: the same with ``logits_to_keep=1`` (only the last position's logits);
* ``probe``: the layer-wise probe (hooks at every block, lens on the option rows only);
* ``eta8_cached`` / ``eta8_full``: a sweep of 8 etas steering the last position at the last
  layer, with the key/value cache reused across etas / with a full forward pass per eta;
* ``null_before_last``: what a steering job with the random-direction null runs at the block
  before last: c_hat at 8 etas, then c_hat and 32 random directions x 8 etas;
* ``peer``: the common peer approach (TransformerLens / tuned-lens style): ``output_hidden_states``
  and a full-vocabulary logit lens at every position of every layer, one layer at a time.

It prints the ratios and merges them into ``bench.json`` in the current directory:
``probe_over_forward`` (target <= 1.05), ``peer_over_probe`` (target >= 5),
``padding_efficiency`` (target >= 0.9), ``eta8_over_probe`` (target <= 1.3),
``null_before_last_over_probe`` (target <= 4) and the peak
memory of each variant in MiB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibrate.engine.edits import Steering
from calibrate.engine.lens import LogitLens
from calibrate.engine.probe import (
    ProbeSettings,
    left_pad,
    plan_batches,
    position_ids,
    run_probe,
    tokenize,
)
from calibrate.engine.steer import run_steered
from calibrate.io.results import merge_json

BENCH_FILE = "bench.json"


class CudaPeakMemory:
    """Peak CUDA memory above the starting point while the block runs, in MiB."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mib = device, float("nan")

    def __enter__(self) -> CudaPeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20


def _batches(loaded, prompts: Sequence[str], settings: ProbeSettings) -> list[tuple[torch.Tensor, ...]]:
    token_ids = tokenize(loaded, prompts)
    lengths = np.array([len(t) for t in token_ids])
    out = []
    for idx in plan_batches(lengths, settings):
        ids, mask = left_pad([token_ids[i] for i in idx], loaded.tokenizer.pad_token_id)
        out.append(tuple(t.to(loaded.device) for t in (ids, mask, position_ids(mask))))
    return out


def plain_forward(loaded, batches, last_logits_only: bool = False) -> None:
    """The reference: the model's own forward pass on the same batches (all logits, or only
    the last position's with ``logits_to_keep=1``, the leanest forward a user could run)."""
    extra = {"logits_to_keep": 1} if last_logits_only else {}
    with torch.inference_mode():
        for ids, mask, pos in batches:
            loaded.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **extra)


def peer_lens(loaded, batches, option_ids: torch.Tensor) -> None:
    """Peer approach: all hidden states, full-vocabulary lens at every position of every layer."""
    lens = LogitLens(loaded.adapter)
    with torch.inference_mode():
        for ids, mask, pos in batches:
            out = loaded.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                               output_hidden_states=True, use_cache=False)
            hidden = out.hidden_states
            for layer, h in enumerate(hidden):
                # transformers' last entry is already normalized; do not normalize it twice
                normed = h.float() if layer == len(hidden) - 1 else lens.normalize(h)
                logits = normed.to(lens.weight.dtype) @ lens.weight.T
                probs = torch.softmax(logits.float(), dim=-1)
                _ = probs[:, -1][:, option_ids]  # the peer reads its options from the full table


def _time(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    with CudaPeakMemory(device) as memory:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    return elapsed, memory.peak_mib


def variants_for(loaded, prompt_set, settings: ProbeSettings) -> dict[str, Callable[[], Any]]:
    """The timed variants on the same prompts and batches."""
    batches = _batches(loaded, prompt_set.prompts, settings)
    option_ids = torch.from_numpy(np.unique(prompt_set.option_ids[prompt_set.option_ids >= 0]))
    variants = {
        "forward": lambda: plain_forward(loaded, batches),
        "forward_last": lambda: plain_forward(loaded, batches, last_logits_only=True),
        "probe": lambda: run_probe(loaded, prompt_set, settings),
        "peer": lambda: peer_lens(loaded, batches, option_ids.to(loaded.device)),
    }
    hidden = loaded.adapter.unembed_weight.shape[1]
    vec = np.random.default_rng(0).standard_normal(hidden)
    steering = Steering(vec / np.linalg.norm(vec), (loaded.adapter.num_blocks,),
                        tuple(float(e) for e in range(8)), "last")
    variants["eta8_cached"] = lambda: run_steered(loaded, prompt_set, steering, settings, use_cache=True)
    variants["eta8_full"] = lambda: run_steered(loaded, prompt_set, steering, settings, use_cache=False)
    variants["truncation"] = lambda: run_steered(loaded, prompt_set, _truncation(loaded), settings)
    variants["null_before_last"] = lambda: _null_before_last(loaded, prompt_set, settings, vec)
    return variants


def _null_before_last(loaded, prompt_set, settings: ProbeSettings, vec: np.ndarray) -> None:
    """What a steering job with the null does at the block before last: c_hat at 8 etas (every
    layer read), then c_hat and 32 random directions x 8 etas (:mod:`calibrate.core.random_null`)."""
    from calibrate.core.random_null import null_vectors
    from calibrate.engine.edits import DirectionSweep

    layer, etas = (loaded.adapter.num_blocks - 1,), tuple(float(e) for e in range(8))
    unit = vec / np.linalg.norm(vec)
    run_steered(loaded, prompt_set, Steering(unit, layer, etas, "last"), settings)
    run_steered(loaded, prompt_set, DirectionSweep(null_vectors(unit, 32, 1), layer, etas), settings)


def _truncation(loaded):
    """Null-space truncation at the last layer next to its random-subspace control (k = 1%)."""
    from calibrate.core import nullspace
    from calibrate.studies.subspace_ablation import SubspaceAblation

    weight = loaded.adapter.unembed_weight.detach().cpu()
    k = nullspace.resolve_k(weight.shape[1])
    basis, _ = nullspace.null_space(weight, k)
    control = nullspace.random_subspace(weight.shape[1], k, 0)
    return SubspaceAblation(bases=(basis.float().numpy(), control.float().numpy()),
                            layers=(loaded.adapter.num_blocks,))


def measure(loaded, prompt_set, settings: ProbeSettings, rounds: int,
            only: Sequence[str] | None = None) -> dict[str, Any]:
    """Interleave the variants ``rounds`` times; medians of time."""
    variants = variants_for(loaded, prompt_set, settings)
    if only:
        variants = {k: v for k, v in variants.items() if k == "probe" or k in only}
    variants["probe"]()  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, float] = {k: 0.0 for k in variants}
    for round_ in range(rounds):
        for name, fn in variants.items():
            elapsed, peak = _time(fn, loaded.device)
            times[name].append(elapsed)
            peaks[name] = max(peaks[name], peak)
            print(f"  round {round_ + 1}/{rounds} {name:12s} {elapsed:8.2f} s")
    med = {k: statistics.median(v) for k, v in times.items()}
    efficiency = run_probe(loaded, prompt_set, settings).padding_efficiency
    if only:
        return {**{f"{k}_over_probe": med[k] / med["probe"] for k in med if k != "probe"},
                **{f"{k}_s": v for k, v in med.items()}}
    return {
        "probe_over_forward": med["probe"] / med["forward"],
        "probe_over_forward_last_logits": med["probe"] / med["forward_last"],
        "eta8_over_probe": med["eta8_cached"] / med["probe"],
        "eta8_full_over_probe": med["eta8_full"] / med["probe"],
        "truncation_over_probe": med["truncation"] / med["probe"],
        "null_before_last_over_probe": med["null_before_last"] / med["probe"],
        "peer_over_probe": med["peer"] / med["probe"],
        "padding_efficiency": efficiency,
        "forward_s": med["forward"], "forward_last_s": med["forward_last"], "probe_s": med["probe"],
        "peer_s": med["peer"], "eta8_cached_s": med["eta8_cached"], "eta8_full_s": med["eta8_full"],
        **{f"{k}_peak_mib": v for k, v in peaks.items()},
    }


_MEMORY_SCRIPT = """
import resource, sys, torch
from calibrate.bench.probe_bench import probe as bench
loaded, prompt_set, settings, variants = bench.setup(sys.argv[1], sys.argv[2], int(sys.argv[3]),
                                                     int(sys.argv[4]))
with torch.inference_mode():  # warm-up on one short input: one-off kernel and allocator setup
    loaded.model(input_ids=torch.tensor([[1, 2, 3]], device=loaded.device))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
variants[sys.argv[5]]()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024.0)
"""


def peak_memory_subprocess(args: argparse.Namespace, variant: str) -> float:
    """Peak resident memory (MiB) a variant adds, each in a fresh process (CPU), so allocator
    caches of one variant cannot hide another's peak."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, args.model, args.dataset,
                           str(args.n), str(args.threads), variant],
                          capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="calibrate bench probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model config name")
    parser.add_argument("--dataset", default="mmlu", help="dataset config name")
    parser.add_argument("--n", type=int, default=8, help="number of prompts")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 is steadier on a busy machine")
    parser.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                        help="time only these variants (with probe, the reference of every ratio)")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the peak-memory measurement (CPU: one process per variant)")
    parser.add_argument("--output", type=Path, default=Path(BENCH_FILE))
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    for name in ("n", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def load_inputs(model: str, dataset: str, n: int):
    """Model, prompts (the first ``n`` after a seeded shuffle), probe settings and the resolved
    config, as every benchmark uses them."""
    import calibrate
    from calibrate.api import typed_config
    from calibrate.tasks.prompts import build_prompts

    # the names first: an unknown dataset or model is one line naming the ones accepted
    records = calibrate.load_dataset(dataset, limit=n, shuffle=True)
    loaded = calibrate.load_model(model)
    cfg = typed_config([f"model={model}", f"dataset={dataset}", f"dataset.limit={n}",
                        "dataset.shuffle=true", "probe.progress=false"])
    prompt_set = build_prompts(records, cfg.dataset, loaded.tokenizer)
    return loaded, prompt_set, cfg.probe, cfg


def setup(model: str, dataset: str, n: int, threads: int):
    """Model, prompts, probe settings and the timed variants, as the benchmark uses them."""
    if threads > 0:
        torch.set_num_threads(threads)
    loaded, prompt_set, settings, _ = load_inputs(model, dataset, n)
    return loaded, prompt_set, settings, variants_for(loaded, prompt_set, settings)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and merge its figures into bench.json."""
    args = parse_args(argv)
    if args.memory_only:
        figures = {f"{name}_peak_mib": peak_memory_subprocess(args, name)
                   for name in ("forward", "probe", "peer", "eta8_cached")}
        merge_json(args.output, figures)
        print(json.dumps(figures, indent=2))
        return figures
    loaded, prompt_set, settings, _ = setup(args.model, args.dataset, args.n, args.threads)
    print(f"bench: {args.model} on {args.n} {args.dataset} prompts, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, device {loaded.device}")
    figures = measure(loaded, prompt_set, settings, args.rounds, args.only)
    if args.only:
        merge_json(args.output, figures)
        print(json.dumps(figures, indent=2))
        return figures
    if loaded.device.type != "cuda":  # CPU: peak resident memory, each variant in its own process
        for name in ("forward", "probe", "peer", "eta8_cached"):
            figures[f"{name}_peak_mib"] = peak_memory_subprocess(args, name)
    figures.update(bench_model=args.model, bench_dataset=args.dataset, bench_n=args.n,
                   bench_rounds=args.rounds, bench_device=str(loaded.device))
    merge_json(args.output, figures)
    print(f"probe / forward     = {figures['probe_over_forward']:.3f}   (target <= 1.05)")
    print(f"probe / forward with last-position logits only = "
          f"{figures['probe_over_forward_last_logits']:.3f}")
    print(f"peer  / probe       = {figures['peer_over_probe']:.2f}   (target >= 5)")
    print(f"padding efficiency  = {figures['padding_efficiency']:.3f}   (target >= 0.9)")
    print(f"8-eta sweep / probe = {figures['eta8_over_probe']:.3f}   (target <= 1.3; "
          f"8 full steered passes: {figures['eta8_full_over_probe']:.2f})")
    print(f"null-space truncation (+ random control) / probe = {figures['truncation_over_probe']:.3f}")
    print(f"c_hat + 32 random directions x 8 etas at the block before last / probe = "
          f"{figures['null_before_last_over_probe']:.3f}   (target <= 4)")
    print(f"peak memory MiB     : forward {figures['forward_peak_mib']:.1f}, probe "
          f"{figures['probe_peak_mib']:.1f}, peer {figures['peer_peak_mib']:.1f}, 8-eta sweep "
          f"{figures['eta8_cached_peak_mib']:.1f}")
    print(f"written to {args.output}")
    return figures


if __name__ == "__main__":
    main()
