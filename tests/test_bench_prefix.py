"""The prefix benchmark's bookkeeping on a fake clock (the timings themselves are not tested)."""

from __future__ import annotations

import numpy as np
import pytest

from calibrate.bench import prefix_bench as bench


def _cases(clock: list[float], costs: dict[str, float], outputs: dict[str, np.ndarray]):
    def call(name):
        def run():
            clock[0] += costs[name]
            return outputs[name]
        return run
    return {"cloze": {name: call(name) for name in bench.VARIANTS}}


def test_ratios_and_difference_from_interleaved_rounds(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    outputs = {"zero_shot": np.zeros((2, 3)),
               "shots_reuse": np.array([[1.0, -np.inf, 2.0], [0.5, 0.25, 1.0]]),
               "shots_recompute": np.array([[1.0, -np.inf, 2.5], [0.5, 0.0, 1.0]])}
    costs = {"zero_shot": 2.0, "shots_reuse": 2.4, "shots_recompute": 9.0}
    figures = bench.measure(_cases(clock, costs, outputs), rounds=3)
    assert figures["prefix_cloze_reuse_over_zero_shot"] == pytest.approx(1.2)
    assert figures["prefix_cloze_recompute_over_zero_shot"] == pytest.approx(4.5)
    assert figures["prefix_cloze_recompute_over_reuse"] == pytest.approx(3.75)
    assert figures["prefix_cloze_max_abs_diff"] == pytest.approx(0.5)  # -inf slots skipped
    assert figures["prefix_cloze_shots_reuse_s"] == pytest.approx(2.4)


def test_runs_that_disagree_on_the_options_are_refused(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    outputs = {"zero_shot": np.zeros(2), "shots_reuse": np.array([1.0, -np.inf]),
               "shots_recompute": np.array([1.0, 2.0])}
    with pytest.raises(RuntimeError, match="cloze: reuse and recompute disagree"):
        bench.measure(_cases(clock, dict.fromkeys(bench.VARIANTS, 1.0), outputs), rounds=1)


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        bench.parse_args(["--cloze-n", "0"])
    assert bench.parse_args(["--kinds", "steer"]).kinds == ["steer"]
