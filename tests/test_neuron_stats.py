"""The neurons study's maths against brute force: null-space fractions from an SVD of W_U, the
logit variance from the explicit vocabulary product, spans from least squares, correlations
from numpy, metrics from the per-layer metrics module, the matched draws' promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibrate.core import neuron_stats as ns
from calibrate.core.metrics import option_metrics
from calibrate.core.nullspace import eigendecomposition
from calibrate.core.option_scores import option_probabilities


def _unembedding(vocab=300, hidden=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, hidden, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("centre", [False, True])
def test_weight_statistics_equal_brute_force(centre):
    unembed = _unembedding()
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(7, 24, generator=g, dtype=torch.float64) * torch.arange(1, 8)[:, None]
    gain = torch.rand(24, generator=g, dtype=torch.float64) + 0.5
    values, vectors = eigendecomposition(unembed)
    k = 3
    stats = ns.weight_statistics(weights, values, vectors, k, gain, centre,
                                 unembed.mean(0), unembed.shape[0])
    u_full, _, _ = np.linalg.svd(unembed.numpy().T, full_matrices=True)  # left: hidden side
    bottom = u_full[:, -k:]  # the k smallest singular values' left vectors
    w = weights.numpy()
    np.testing.assert_allclose(stats.norm, np.linalg.norm(w, axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats.null_fraction,
                               (np.linalg.norm(w @ bottom, axis=1) / np.linalg.norm(w, axis=1)) ** 2,
                               rtol=1e-8)
    for i in range(len(w)):
        unit = w[i] / np.linalg.norm(w[i])
        if centre:
            unit = unit - unit.mean()
        effect = unembed.numpy() @ (gain.numpy() * unit)
        assert stats.logit_var[i] == pytest.approx(np.var(effect), rel=1e-9)
    np.testing.assert_allclose(stats.null_norm, stats.norm * np.sqrt(stats.null_fraction))


def test_a_vector_in_the_null_space_has_fraction_one_and_no_logit_effect():
    unembed = _unembedding()
    values, vectors = eigendecomposition(unembed)
    u = vectors[:, 0]
    planted = unembed - (unembed @ u)[:, None] * u[None]  # u becomes an exact null direction
    values, vectors = eigendecomposition(planted)
    stats = ns.weight_statistics((5 * u)[None], values, vectors, 1, torch.ones(24), False,
                                 planted.mean(0), planted.shape[0])
    assert stats.null_fraction[0] == pytest.approx(1.0, abs=1e-9)
    assert stats.logit_var[0] == pytest.approx(0.0, abs=1e-9)


def test_percentiles_robust_z_flags_and_ranking():
    values = np.array([3.0, 1.0, 2.0, 2.0, 10.0])
    np.testing.assert_allclose(ns.percentiles(values), [0.8, 0.2, 0.6, 0.6, 1.0])
    z = ns.robust_z(values)
    assert z[4] == pytest.approx((10 - 2) / (1.4826 * 1.0)) and z[2] == 0
    flags = ns.entropy_flags(np.array([0.99, 0.995, 0.5]), np.array([0.6, 0.4, 0.9]), 0.99, 0.5)
    assert flags.tolist() == [True, False, False]
    assert ns.top_indices(np.array([1.0, 5.0, 5.0, 0.0]), 3).tolist() == [1, 2, 0]


def test_token_counts_and_frequency_correlation():
    counts = ns.token_counts([[1, 2, 2, 5], [2, 7, 99]], vocab=8)
    assert counts.tolist() == [0, 1, 3, 0, 0, 1, 0, 1]  # 99 is outside the vocabulary
    rng = np.random.default_rng(0)
    freq = np.array([1, 3, 9, 27, 5, 2])
    effects = rng.standard_normal((4, 6))
    effects[0] = 2 * np.log(freq) + 1  # a perfect token-frequency neuron
    got = ns.frequency_correlation(torch.as_tensor(effects), freq)
    want = [np.corrcoef(e, np.log(freq))[0, 1] for e in effects]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert got[0] == pytest.approx(1.0)
    assert np.isnan(ns.frequency_correlation(torch.ones(2, 3), np.array([2, 2, 2]))).all()


def test_matched_pools_and_draws():
    norms = np.array([10.0, 1.0, 2.0, 3.0, 9.0, 8.5, 7.0, 9.5, 4.0])
    blocks = np.array([1, 1, 1, 1, 1, 2, 2, 2, 2])
    candidates = np.array([0, 7])
    pools = ns.matched_pools(norms, blocks, candidates, 2)
    assert pools[0].tolist() == [4, 3]  # block 1, nearest to 10: 9 then 3
    assert pools[1].tolist() == [5, 6]  # block 2 without the candidate 7
    draws = ns.matched_draws(pools, 50, seed=0)
    assert draws.shape == (50, 2)
    assert np.isin(draws[:, 0], pools[0]).all() and np.isin(draws[:, 1], pools[1]).all()
    assert (draws[:, 0] != draws[:, 1]).all()
    np.testing.assert_array_equal(draws, ns.matched_draws(pools, 50, seed=0))  # seeded
    same_block = ns.matched_pools(norms, np.ones(9, int), np.array([0, 4]), 2)
    d = ns.matched_draws(same_block, 200, seed=1)
    assert (d[:, 0] != d[:, 1]).all()  # distinct within a draw although the pools overlap
    with pytest.raises(ValueError, match="used up"):
        ns.matched_draws([np.array([3]), np.array([3])], 1, 0)


def test_span_share_and_its_null():
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((3, 10))
    v = rng.standard_normal(10)
    coef, *_ = np.linalg.lstsq(vectors.T, v, rcond=None)
    projected = vectors.T @ coef
    assert ns.span_share(v, vectors) == pytest.approx(projected @ projected / (v @ v))
    assert ns.span_share(vectors[0] + 2 * vectors[1], vectors) == pytest.approx(1.0)
    weights = rng.standard_normal((40, 10))
    weights[:2] = [v + 0.01 * rng.standard_normal(10), rng.standard_normal(10)]
    draws = np.array([[i, i + 1] for i in range(2, 38)])
    out = ns.span_null(v, weights, np.array([0, 1]), draws)
    assert out["share"] > 0.99 and out["p_value"] == pytest.approx(1 / 37)
    assert out["random_subspace"] == pytest.approx(0.2) and out["n_draws"] == 36
    np.testing.assert_allclose(ns.cosines(v, np.stack([v, -2 * v])), [1.0, -1.0])


def test_variant_metrics_equal_the_metrics_module():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 3, 40, 4)) * 3
    labels = rng.integers(0, 4, 40)
    got = ns.variant_metrics(logits, labels, 15, "guo")
    for i in range(2):
        for j in range(3):
            want = option_metrics(option_probabilities(logits[i, j]), labels)
            for m in ns.EFFECT_METRICS:
                assert got[m][i, j] == pytest.approx(want[m], abs=1e-12), m


def test_null_p_values_are_two_sided_about_the_null_median():
    null = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    assert ns.null_p_value(10.0, null) == pytest.approx(1 / 6)
    assert ns.null_p_value(-10.0, null) == pytest.approx(1 / 6)
    assert ns.null_p_value(0.0, null) == pytest.approx(1.0)
    assert ns.null_p_value(5.5, null + 5) == pytest.approx(5 / 6)  # about the median 5
    assert ns.null_p_value(1.5, null + 5) == pytest.approx(1 / 6)
    out = ns.null_summary({"ece": 3.0}, {"ece": null})
    assert out["p_value_ece"] == pytest.approx(1 / 6) and out["null_delta_ece_median"] == 0.0


def test_effect_table_deltas_and_intervals():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((60, 2, 2))
    arms = np.stack([base, base * 3])  # the same scores, and sharper ones
    labels = rng.integers(0, 2, 60)
    rows = ns.effect_table(base, arms, labels, ["same", "sharp"], [5, 6], "total", 15, "guo",
                           50, 0.05, 0)
    assert [(r["arm"], r["layer"]) for r in rows] == [("same", 5), ("same", 6), ("sharp", 5),
                                                      ("sharp", 6)]
    for r in rows[:2]:
        assert all(r[f"delta_{m}"] == 0 for m in ns.EFFECT_METRICS) and r["changed"] == 0
        assert r["delta_entropy_lo"] == r["delta_entropy_hi"] == 0
    for r, layer in zip(rows[2:], (0, 1)):
        want = option_metrics(option_probabilities(base[:, layer] * 3), labels)
        ref = option_metrics(option_probabilities(base[:, layer]), labels)
        assert r["delta_entropy"] == pytest.approx(want["entropy"] - ref["entropy"])
        assert r["delta_entropy_hi"] < 0 and r["significant_entropy"]  # sharper: less entropy
        assert r["changed"] == 0  # scaling keeps every answer
