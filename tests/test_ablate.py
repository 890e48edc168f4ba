"""Subspace ablations against references: the projection algebra by hand, variant 0 untouched,
only layers at and after the edit change, the key/value path equals a full forward, and removing
the whole residual at the last layer leaves what the lens makes of a zero vector."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from calibrate.engine.probe import ProbeSettings, run_probe
from calibrate.engine.steer import run_steered
from calibrate.studies.subspace_ablation import SubspaceAblation, _means, final_deltas
from calibrate.tasks.prompts import PromptConfig, build_prompts

QUIET = ProbeSettings(progress=False)
DATASET = PromptConfig(name="toy", answer_format="verbalizer", verbalizer=[" negative", " positive"],
                       template="{question} \n question : is this sentence positive or negative ? "
                                "answer :")
SENTENCES = ["the movie was great", "a very boring film", "this film is not good , it was bad",
             "fun", "the the the movie was very very fun and good good"]


def prompt_set(tokenizer):
    from types import SimpleNamespace

    recs = [SimpleNamespace(question=s, options=("bad", "good"), label=i % 2, subject="")
            for i, s in enumerate(SENTENCES)]
    return build_prompts(recs, DATASET, tokenizer)


def hidden_of(tiny):
    return tiny.adapter.unembed_weight.shape[1]


def orthonormal(hidden: int, k: int, seed: int = 0) -> np.ndarray:
    """A random [hidden, k] basis with orthonormal columns (float64)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((hidden, k)))
    return q


def rows_and_variants(hidden: int = 16, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(6, 3, hidden, generator=gen, dtype=torch.float64)
    variant = torch.tensor([0, 1, 2, 0, 1, 2])
    return h, variant


# ---------------------------------------------------------------- the edit itself


def test_variant_zero_rows_are_bit_identical():
    h, variant = rows_and_variants()
    ab = SubspaceAblation(bases=(orthonormal(16, 3), orthonormal(16, 5, seed=2)), layers=(1,))
    out = ab.apply(1, h, variant)
    assert ab.n_variants == 3
    assert torch.equal(out[variant == 0], h[variant == 0])
    assert not torch.allclose(out[variant == 1], h[variant == 1])
    assert not torch.allclose(out[variant == 2], h[variant == 2])
    assert not torch.equal(out[variant == 1], out[variant == 2])  # each variant has its own basis


def test_empty_basis_is_the_identity():
    h, variant = rows_and_variants()
    ab = SubspaceAblation(bases=(np.zeros((16, 0)), np.zeros((16, 0))), layers=(1,))
    assert torch.equal(ab.apply(1, h, variant), h)
    h32 = h.float()
    assert torch.equal(ab.apply(1, h32, variant), h32)


def test_zero_ablation_removes_the_span_and_keeps_the_rest():
    h, variant = rows_and_variants()
    u = orthonormal(16, 4)
    ab = SubspaceAblation(bases=(u, orthonormal(16, 2, seed=5)), layers=(2,))
    out = ab.apply(2, h, variant).numpy()
    rows = (variant == 1).numpy()
    x, y = h.numpy()[rows], out[rows]
    np.testing.assert_allclose(y @ u, 0.0, atol=1e-12)  # nothing left in span(U)
    perp = np.eye(16) - u @ u.T  # the orthogonal part, by hand
    np.testing.assert_allclose(y, x @ perp, atol=1e-12)
    np.testing.assert_allclose(y @ perp, x @ perp, atol=1e-12)


def test_mean_ablation_puts_the_mean_component_back():
    h, variant = rows_and_variants()
    u = orthonormal(16, 4)
    mean = np.random.default_rng(9).standard_normal(16)
    ab = SubspaceAblation(bases=(u, orthonormal(16, 2, seed=5)), layers=(2,), means={2: mean})
    out = ab.apply(2, h, variant).numpy()
    rows = (variant == 1).numpy()
    x, y = h.numpy()[rows], out[rows]
    coeff = y @ u  # [rows, T, k]: every row now carries the mean's coefficients
    np.testing.assert_allclose(coeff, np.broadcast_to(mean @ u, coeff.shape), atol=1e-12)
    perp = np.eye(16) - u @ u.T
    np.testing.assert_allclose(y, x @ perp + u @ u.T @ mean, atol=1e-12)
    np.testing.assert_array_equal(out[(variant == 0).numpy()], h.numpy()[(variant == 0).numpy()])


def test_float32_hidden_keeps_its_dtype():
    h, variant = rows_and_variants()
    ab = SubspaceAblation(bases=(orthonormal(16, 3).astype(np.float32),))
    out = ab.apply(0, h.float(), variant % 2)
    assert out.dtype == torch.float32 and out.shape == h.shape


# ---------------------------------------------------------------- on tiny models


def test_ablation_changes_only_layers_from_the_edit(tiny):
    ps = prompt_set(tiny.tokenizer)
    h = hidden_of(tiny)
    ab = SubspaceAblation(bases=(orthonormal(h, 8).astype(np.float32),), layers=(2,))
    out = run_steered(tiny, ps, ab, QUIET)
    assert out.shape == (2, len(ps.prompts), tiny.adapter.num_blocks + 1, 2)
    base = run_probe(tiny, ps, QUIET)
    np.testing.assert_allclose(out[0], base.option_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1][:, :2], out[0][:, :2], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[1][:, 2], out[0][:, 2], atol=1e-4)  # the edited layer itself
    assert not np.allclose(out[1][:, 3:], out[0][:, 3:], atol=1e-4)


def test_cached_path_equals_full_forward(tiny):
    ps = prompt_set(tiny.tokenizer)
    h = hidden_of(tiny)
    u, control = orthonormal(h, 6), orthonormal(h, 6, seed=3)
    mean = np.random.default_rng(4).standard_normal(h)
    # mean ablation (zero ablation is its special case mean = 0), two layers, two bases
    ab = SubspaceAblation(bases=(u.astype(np.float32), control.astype(np.float32)),
                          layers=(1, 3), means={1: mean, 3: 2 * mean})
    cached = run_steered(tiny, ps, ab, QUIET, use_cache=True)
    full = run_steered(tiny, ps, ab, QUIET, use_cache=False)
    np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)
    assert not np.allclose(cached[1], cached[0], atol=1e-4)
    assert not np.allclose(cached[2], cached[1], atol=1e-4)


def test_whole_space_at_the_last_layer_leaves_the_lens_of_zero(tiny):
    """U = I removes the residual entirely: the final norm of 0 is its bias (LayerNorm) or 0
    (RMSNorm), so the final option logits are W_U[option] . beta + b[option], whatever the input."""
    adapter = tiny.adapter
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # make bias terms non-zero so the reference is not trivially 0
        if getattr(adapter.final_norm, "bias", None) is not None:
            adapter.final_norm.bias.copy_(torch.randn(adapter.final_norm.bias.shape, generator=gen))
        if adapter.unembed_bias is not None:
            adapter.unembed_bias.copy_(torch.randn(adapter.unembed_bias.shape, generator=gen))
    ps = prompt_set(tiny.tokenizer)
    h, last = hidden_of(tiny), adapter.num_blocks
    ab = SubspaceAblation(bases=(np.eye(h, dtype=np.float32),), layers=(last,))
    out = run_steered(tiny, ps, ab, QUIET)

    beta = getattr(adapter.final_norm, "bias", None)
    normed = np.zeros(h) if beta is None else beta.detach().double().numpy()
    w = adapter.unembed_weight.detach().double().numpy()
    expected = w[ps.option_ids] @ normed  # [N, K]
    if adapter.unembed_bias is not None:
        expected = expected + adapter.unembed_bias.detach().double().numpy()[ps.option_ids]
    if adapter.softcap is not None:
        expected = np.tanh(expected / adapter.softcap) * adapter.softcap
    np.testing.assert_allclose(out[1][:, last], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1][:, :last], out[0][:, :last], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[0][:, last], expected, atol=1e-3)  # the unablated model differs


# ---------------------------------------------------------------- bookkeeping


def test_final_deltas_reads_the_last_layer_of_the_variant():
    rows = []
    for variant, offset in (("none", 0.0), ("nullspace", 0.1), ("random", 0.2)):
        for layer in range(3):
            rows.append({"variant": variant, "layer": layer, "accuracy": 0.5 + offset + layer,
                         "ece": offset * layer, "mce": 2 * offset, "delta_accuracy": offset - layer,
                         "delta_ece": offset * 10 + layer, "delta_mce": -offset,
                         "changed": layer / 4})
    table = pd.DataFrame(rows)
    got = final_deltas(table, "nullspace")
    assert got == pytest.approx({"delta_accuracy": 0.1 - 2, "delta_ece": 1.0 + 2, "delta_mce": -0.1,
                                 "changed": 0.5, "accuracy": 2.6, "ece": 0.2, "mce": 0.2})
    assert all(type(v) is float for v in got.values())
    assert final_deltas(table, "random")["accuracy"] == pytest.approx(2.7)


def test_unknown_ablation_is_named():
    from conftest import typed

    from calibrate.engine.edits import InterventionSettings
    from calibrate.errors import ConfigError

    # the ablation is checked with the intervention settings (typed), not when it is used
    with pytest.raises(ConfigError, match=r"intervention\.ablation='median'.*zero, mean"):
        InterventionSettings(name="nullspace", ablation="median")
    with pytest.raises(ConfigError, match=r"intervention\.ablation='median'.*zero, mean"):
        typed("intervention=nullspace", "intervention.ablation=median")
    assert _means(None, (1,), "zero") is None
