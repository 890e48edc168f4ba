"""Interleaved timing rounds shared by the benches: every variant once per round, side by side
in one process, so a noisy machine slows all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def median_seconds(variants: Mapping[str, Callable[[], object]], rounds: int,
                   width: int = 14) -> dict[str, float]:
    """Run each variant once per round, in order, printing each time; the median per variant."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for round_ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            print(f"  round {round_ + 1}/{rounds} {name:{width}s} {times[name][-1]:8.2f} s")
    return {k: statistics.median(v) for k, v in times.items()}
