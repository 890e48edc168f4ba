"""Last-layer edits read without forward passes against full steered forward passes."""

from __future__ import annotations

import numpy as np
import pytest

from calibrate.engine.edits import DirectionSweep, Steering
from calibrate.engine.last_layer import last_layer_logits, last_layer_steered
from calibrate.engine.probe import ProbeSettings, run_probe
from calibrate.engine.steer import run_steered
from calibrate.tasks.prompts import PromptConfig, build_prompts

QUIET = ProbeSettings(progress=False)
DATASET = PromptConfig(name="toy", answer_format="verbalizer", verbalizer=[" bad", " good"],
                       template="{question} question : good or bad ? answer :")
SENTENCES = ["the movie was great", "a very boring film", "fun", "this film is not good , it was bad"]


def prompts(tokenizer):
    from types import SimpleNamespace

    recs = [SimpleNamespace(question=s, options=("bad", "good"), label=i % 2, subject="")
            for i, s in enumerate(SENTENCES)]
    return build_prompts(recs, DATASET, tokenizer)


def unit(hidden, seed=0):
    v = np.random.default_rng(seed).standard_normal(hidden)
    return v / np.linalg.norm(v)


def test_last_layer_steered_equals_full_steered_passes(tiny):
    ps = prompts(tiny.tokenizer)
    last = tiny.adapter.num_blocks
    base = run_probe(tiny, ps, ProbeSettings(progress=False).keeping((last,)))
    hidden = tiny.adapter.unembed_weight.shape[1]
    for edit in (Steering(unit(hidden), (last,), (0.0, 2.0, -5.0)),
                 DirectionSweep(np.stack([unit(hidden, s) for s in range(3)]), (last,), (0.0, 3.0))):
        fast = last_layer_steered(tiny, base.option_logits, base.residuals[last], ps.option_ids, edit)
        full = run_steered(tiny, ps, edit, QUIET, use_cache=False)
        np.testing.assert_allclose(fast, full, rtol=1e-4, atol=1e-4)
        assert not np.allclose(fast[-1, :, -1], fast[0, :, -1], atol=1e-3)


def test_last_layer_steered_agrees_with_the_direction_readout(tiny):
    ps = prompts(tiny.tokenizer)
    last = tiny.adapter.num_blocks
    base = run_probe(tiny, ps, ProbeSettings(progress=False).keeping((last,)))
    vec = unit(tiny.adapter.unembed_weight.shape[1])
    fast = last_layer_steered(tiny, base.option_logits, base.residuals[last], ps.option_ids,
                              Steering(vec, (last,), (0.0, 4.0)))
    other = last_layer_logits(tiny, base.residuals[last], ps.option_ids, vec[None], np.array([0.0, 4.0]))
    np.testing.assert_allclose(fast[:, :, -1], other[0], rtol=1e-6, atol=1e-6)
    # the default readout is the logit lens: passing it explicitly reads the same
    from calibrate.engine.lens import LogitLens

    lens = LogitLens(tiny.adapter)
    np.testing.assert_array_equal(
        last_layer_steered(tiny, base.option_logits, base.residuals[last], ps.option_ids,
                           Steering(vec, (last,), (0.0, 4.0)), readout=lens), fast)
    np.testing.assert_array_equal(
        last_layer_logits(tiny, base.residuals[last], ps.option_ids, vec[None],
                          np.array([0.0, 4.0]), readout=lens), other)


def test_an_edit_below_the_last_layer_is_refused(tiny):
    ps = prompts(tiny.tokenizer)
    base = run_probe(tiny, ps, ProbeSettings(progress=False).keeping((3,)))
    with pytest.raises(ValueError, match="not only at the last layer 3"):
        last_layer_steered(tiny, base.option_logits, base.residuals[3], ps.option_ids,
                           Steering(unit(32), (2,), (0.0, 1.0)))


def test_the_exact_read_is_recognised_and_equals_the_lens_read(tiny):
    """Every architecture's final norm is recognised (RMSNorm, Gemma's 1 + weight, LayerNorm)
    and the float64 algebra equals the readout's read of the edited residuals, at scales from
    a tenth to fifty times the residual's norm and for many directions at once."""
    from calibrate.engine.last_layer import LastLayerReader

    ps = prompts(tiny.tokenizer)
    last = tiny.adapter.num_blocks
    base = run_probe(tiny, ps, ProbeSettings(progress=False).keeping((last,)))
    hidden = tiny.adapter.unembed_weight.shape[1]
    residual = base.residuals[last]
    reader = LastLayerReader(tiny, residual, ps.option_ids)
    assert reader.exact
    vectors = np.stack([unit(hidden, s) for s in range(5)])
    norm = float(np.linalg.norm(residual, axis=1).mean())
    scales = norm * np.array([[0.0, 0.1, -1.0, 50.0]] * 5)
    fast = reader.logits(vectors, scales)
    slow = reader._read(vectors, scales, np.arange(len(residual)))
    np.testing.assert_allclose(fast, slow, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(fast[0, 0], base.option_logits[:, -1], rtol=1e-4, atol=1e-4)
    flat = reader.logits(vectors, scales[:, 2])  # one scale per direction: [D, N, K]
    np.testing.assert_allclose(flat, fast[:, 2], rtol=1e-12, atol=1e-12)


def test_sweep_reads_what_logits_reads_one_direction_at_a_time(tiny):
    """The search's read (each direction's products once, any subset of directions at any
    scales) equals :meth:`logits` of those directions alone, on the exact path and the
    readout's; the scales differ per direction and a direction may appear twice."""
    from calibrate.engine.last_layer import LastLayerReader

    ps = prompts(tiny.tokenizer)
    last = tiny.adapter.num_blocks
    base = run_probe(tiny, ps, ProbeSettings(progress=False).keeping((last,)))
    hidden = tiny.adapter.unembed_weight.shape[1]
    residual = base.residuals[last]
    vectors = np.stack([unit(hidden, s) for s in range(6)])
    norm = float(np.linalg.norm(residual, axis=1).mean())
    which = np.array([4, 0, 2, 2, 5])
    scales = norm * np.array([0.3, -2.0, 0.05, 7.0, 1.0])
    reader = LastLayerReader(tiny, residual, ps.option_ids)
    assert reader.exact
    for path in ("exact", "readout"):
        if path == "readout":
            reader.form = None  # the fallback: reads through the readout
        read = reader.sweep(vectors)(which, scales)
        assert read.shape == (len(which), len(residual), 2)
        for i, (d, s) in enumerate(zip(which, scales)):
            alone = reader.logits(vectors[d][None], np.array([s]))[0]
            np.testing.assert_allclose(read[i], alone, rtol=1e-12, atol=1e-12)
        if path == "exact":
            exact_read = read
    np.testing.assert_allclose(exact_read, read, rtol=2e-4, atol=2e-4)  # the two paths agree


def _reference_combine(reader, b, q1, q2, grid, rows):
    """LastLayerReader._combine as first written: the expression with a temporary per step."""
    slot = reader._slot[rows]
    num_a = reader._a[rows][None, None]
    num_b = b[:, slot][:, None]
    s = grid[:, :, None, None]
    denom = np.sqrt(reader._q0[rows][None, None, :, None] + s * q1[:, None, :, None]
                    + s ** 2 * q2[:, None, None, None] + reader._form_eps)
    logits = (num_a + s * num_b) / denom + reader._const[slot][None, None]
    if reader.lens.softcap is not None:
        logits = np.tanh(logits / reader.lens.softcap) * reader.lens.softcap
    return np.where(reader.ids[rows][None, None] < 0, -np.inf, logits)


def test_the_exact_read_equals_its_expression_bit_for_bit(tiny, monkeypatch):
    """The in-place read gives the expression's float64 values, with and without soft-capping
    and with a missing option slot (-inf), for a subset of rows and many scales."""
    from calibrate.engine.last_layer import LastLayerReader

    ps = prompts(tiny.tokenizer)
    last = tiny.adapter.num_blocks
    base = run_probe(tiny, ps, ProbeSettings(progress=False).keeping((last,)))
    hidden = tiny.adapter.unembed_weight.shape[1]
    reader = LastLayerReader(tiny, base.residuals[last], ps.option_ids)
    assert reader.exact
    vectors = np.stack([unit(hidden, s) for s in range(4)])
    grid = np.array([[0.0, 0.5, -3.0], [1.0, 2.0, 40.0], [0.1, -0.2, 0.3], [5.0, 0.0, -1.0]])
    rows = np.array([3, 0, 2])
    products = reader._products(vectors, rows)
    for softcap in (None, 3.0):
        monkeypatch.setattr(reader.lens, "softcap", softcap)
        for ids in (reader.ids, np.where(np.arange(reader.ids.size).reshape(reader.ids.shape)
                                         == 1, -1, reader.ids)):
            monkeypatch.setattr(reader, "ids", ids)
            got = reader._combine(*products, grid, rows)
            want = _reference_combine(reader, *products, grid, rows)
            assert got.shape == want.shape == (4, 3, 3, ids.shape[1])
            assert np.array_equal(got, want)
    assert np.isneginf(got[:, :, 1, 1]).all()  # rows[1] is example 0, whose option 1 is gone
