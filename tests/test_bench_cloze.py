"""The cloze benchmark's arithmetic, on a hand-counted example (the timings are not tested)."""

from __future__ import annotations

import pytest

from calibrate.bench.cloze_bench import matmul_ratio
from calibrate.tasks.continuations import ClozeRequest


def test_matmul_ratio_hand_counted():
    # context of 3 tokens; options [7, 8] and [7, 9, 4]: cloze runs 3 + 1 + 2 = 6 tokens, and the
    # lens reads 3 distinct states (context end; after 7; after 7, 9), each at 2 layers
    requests = [ClozeRequest([1, 2, 3], [[7, 8], [7, 9, 4]], ("a", "b"))]
    body, vocab, hidden, layers = 100, 10, 2, 2
    out = matmul_ratio(requests, body, vocab, hidden, layers)
    cloze = 6 * body + 3 * layers * vocab * hidden  # 600 + 120
    lmeval = (3 + 1 + 3 + 2) * (body + vocab * hidden)  # 9 tokens run, 120 each
    assert out["cloze_over_lmeval_matmul"] == pytest.approx(cloze / lmeval)
    assert out["cloze_lens_share_matmul"] == pytest.approx(120 / 720)
