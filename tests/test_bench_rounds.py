"""calibrate.bench.rounds: variants interleaved round by round, the median of each one's times."""

from __future__ import annotations

from calibrate.bench import rounds


def test_variants_interleave_and_the_median_is_per_variant(monkeypatch, capsys):
    clock = iter([0.0, 1.0, 1.0, 4.0, 10.0, 13.0, 20.0, 22.0, 30.0, 35.0, 40.0, 41.0])
    monkeypatch.setattr(rounds.time, "perf_counter", lambda: next(clock))
    calls = []
    med = rounds.median_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                3, width=2)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    # a took 1, 3, 5 s; b took 3, 2, 1 s
    assert med == {"a": 3.0, "b": 2.0}
    assert capsys.readouterr().out.splitlines()[0] == "  round 1/3 a      1.00 s"
