"""Benchmark: the null space through the Gram matrix against a full SVD of the unembedding.

``calibrate bench nullspace [--hidden 576 --vocab 49152 --repeats 3 ...]`` times both
routes on one random ``[vocab, hidden]`` matrix (default: SmolLM2-135M's unembedding shape),
prints the best time of each and the speedup, and merges ``nullspace_gram_s``,
``nullspace_svd_s`` and ``nullspace_speedup`` (plus the settings, under ``nullspace_bench``)
into ``bench.json`` in the current directory. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from calibrate.core import nullspace
from calibrate.io.results import merge_json

BENCH_FILE = "bench.json"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576, help="d_model (SmolLM2-135M: 576)")
    parser.add_argument("--vocab", type=int, default=49152, help="vocab size (SmolLM2: 49152)")
    parser.add_argument(
        "--k", type=int, default=None, help="null-space size; default 1%% of hidden"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per route; best kept")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the weight's dtype")
    # float32 is the faster SVD, so the reported speedup is a lower bound; float64 matches the
    # Gram route's precision.
    parser.add_argument("--svd-dtype", choices=DTYPES, default="float32", help="SVD precision")
    parser.add_argument("--chunk-rows", type=int, default=nullspace.DEFAULT_CHUNK_ROWS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path(BENCH_FILE))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The fastest of ``repeats`` wall-clock runs of ``fn`` and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def svd_null_space(weight: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Bottom-k left singular vectors of ``weightᵀ`` from a full thin SVD."""
    u, _, _ = torch.linalg.svd(weight.T.to(dtype), full_matrices=False)
    return u[:, u.shape[1] - k :]


def projector_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest entry of ``|A Aᵀ - B Bᵀ|``: the two bases span the same space when it is small."""
    a, b = a.double(), b.double()
    return float((a @ a.T - b @ b.T).abs().max())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time both routes on one random matrix and return the bench.json entries."""
    k = nullspace.resolve_k(args.hidden, args.k)
    generator = torch.Generator().manual_seed(args.seed)
    weight = torch.randn(args.vocab, args.hidden, generator=generator).to(DTYPES[args.dtype])
    svd_dtype = DTYPES[args.svd_dtype]
    # Warm up both LAPACK paths so neither timing pays a one-off initialisation.
    nullspace.null_space(weight[: 4 * k + 8, :16], 1)
    svd_null_space(weight[: 4 * k + 8, :16], 1, svd_dtype)
    gram_s, (gram_basis, _) = best_time(
        lambda: nullspace.null_space(weight, k, args.chunk_rows), args.repeats
    )
    svd_s, svd_basis = best_time(lambda: svd_null_space(weight, k, svd_dtype), args.repeats)
    settings = vars(args) | {"k": k, "threads": torch.get_num_threads()}
    settings["output"] = str(args.output)
    settings["projector_max_diff"] = projector_gap(gram_basis, svd_basis)
    return {
        "nullspace_gram_s": gram_s,
        "nullspace_svd_s": svd_s,
        "nullspace_speedup": svd_s / gram_s,
        "nullspace_bench": settings,
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    results = run(args)
    settings = results["nullspace_bench"]
    print(
        f"unembedding [{args.vocab} x {args.hidden}] {args.dtype}, k={settings['k']}, "
        f"{settings['threads']} threads, best of {args.repeats}"
    )
    print(f"  gram + eigh : {results['nullspace_gram_s']:.3f} s")
    print(f"  svd ({args.svd_dtype}): {results['nullspace_svd_s']:.3f} s")
    print(f"  speedup     : {results['nullspace_speedup']:.1f}x")
    print(f"  max |P_gram - P_svd| = {settings['projector_max_diff']:.2e}")
    merge_json(args.output, results)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
