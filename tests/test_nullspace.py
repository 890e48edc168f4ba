"""Tests for calibrate.core.nullspace (and the calibrate.core.subspace maths it re-exports): the
Gram route against a reference SVD, projection maths, random baselines and the on-disk cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from calibrate.core import nullspace as ns
from calibrate.core import subspace
from calibrate.io import nullspace_cache as cache

VOCAB, HIDDEN, K = 300, 24, 4
SMALL_SIGMA = 1e-3


def planted_weight(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A [VOCAB, HIDDEN] float64 matrix whose K bottom right singular directions are planted.

    Returns the weight and the planted [HIDDEN, K] orthonormal basis.
    """
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(VOCAB, HIDDEN, dtype=torch.float64, generator=generator))
    right, _ = torch.linalg.qr(
        torch.randn(HIDDEN, HIDDEN, dtype=torch.float64, generator=generator)
    )
    sigmas = torch.linspace(1.0, 5.0, HIDDEN, dtype=torch.float64)
    sigmas[:K] = SMALL_SIGMA * torch.arange(1, K + 1, dtype=torch.float64)
    weight = left @ torch.diag(sigmas) @ right.T
    return weight, right[:, :K]


@pytest.fixture(scope="module")
def planted() -> tuple[torch.Tensor, torch.Tensor]:
    return planted_weight()


# --- projector --------------------------------------------------------------------------------


def test_projector_is_orthogonal_projector(planted):
    weight, _ = planted
    basis, _ = ns.null_space(weight, K)
    p = ns.projector_complement(basis)
    torch.testing.assert_close(p @ p, p, atol=1e-12, rtol=0)
    torch.testing.assert_close(p, p.T, atol=0, rtol=0)
    torch.testing.assert_close(p @ basis, torch.zeros_like(basis), atol=1e-12, rtol=0)
    assert torch.linalg.matrix_rank(p) == HIDDEN - K


def test_basis_is_orthonormal(planted):
    basis, _ = ns.null_space(planted[0], K)
    assert basis.dtype == torch.float64 and basis.shape == (HIDDEN, K)
    torch.testing.assert_close(basis.T @ basis, torch.eye(K, dtype=torch.float64))


# --- Gram route against a reference SVD --------------------------------------------------------


def test_gram_route_matches_svd(planted):
    weight, truth = planted
    basis, sigma = ns.null_space(weight, K)
    u_svd, s_svd, _ = torch.linalg.svd(weight.T, full_matrices=False)
    u_ref, s_ref = u_svd[:, -K:].flip(1), s_svd[-K:].flip(0)  # svd is descending
    torch.testing.assert_close((basis.T @ u_ref).abs(), torch.eye(K, dtype=torch.float64))
    torch.testing.assert_close(sigma, s_ref, atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(basis @ basis.T, truth @ truth.T, atol=1e-9, rtol=0)
    assert bool((sigma[1:] >= sigma[:-1]).all())


def test_gram_route_matches_svd_for_every_k(planted):
    weight, _ = planted
    u_svd, s_svd, _ = torch.linalg.svd(weight.T, full_matrices=False)
    for k in (1, 7, HIDDEN):
        basis, sigma = ns.null_space(weight, k)
        u_ref = u_svd[:, HIDDEN - k :]
        torch.testing.assert_close(basis @ basis.T, u_ref @ u_ref.T, atol=1e-8, rtol=0)
        torch.testing.assert_close(sigma, s_svd[HIDDEN - k :].flip(0), atol=1e-9, rtol=1e-6)


def test_chunked_gram_equals_unchunked(planted):
    weight, _ = planted
    full = ns.gram_matrix(weight, chunk_rows=VOCAB)
    torch.testing.assert_close(full, weight.T @ weight, atol=1e-12, rtol=1e-12)
    for chunk_rows in (1, 7, 128, 10_000):
        torch.testing.assert_close(ns.gram_matrix(weight, chunk_rows), full, atol=1e-12, rtol=1e-12)


def test_bf16_input(planted):
    weight = planted[0].to(torch.bfloat16)
    gram = ns.gram_matrix(weight, chunk_rows=64)
    exact = weight.double().T @ weight.double()
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram, exact, atol=1e-10, rtol=1e-10)
    basis, sigma = ns.null_space(weight, K, chunk_rows=64)
    u_svd, s_svd, _ = torch.linalg.svd(weight.double().T, full_matrices=False)
    u_ref = u_svd[:, -K:]
    torch.testing.assert_close(basis @ basis.T, u_ref @ u_ref.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(sigma, s_svd[-K:].flip(0), atol=1e-6, rtol=1e-4)


def test_signs_are_canonical(planted):
    basis, _ = ns.null_space(planted[0], K)
    rows = basis.abs().argmax(dim=0)
    assert bool((basis[rows, torch.arange(K)] > 0).all())


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="vocab, hidden"):
        ns.gram_matrix(torch.zeros(3))
    with pytest.raises(ValueError, match="chunk_rows"):
        ns.gram_matrix(torch.zeros(3, 2), chunk_rows=0)
    with pytest.raises(ValueError, match=r"k must be in \[0, hidden=2\]"):
        ns.null_space(torch.ones(3, 2), 3)


# --- alignment --------------------------------------------------------------------------------


def test_alignment_inside_and_orthogonal(planted):
    basis, _ = ns.null_space(planted[0], K)
    inside = basis @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    orthogonal = ns.projector_complement(basis) @ torch.randn(HIDDEN, dtype=torch.float64)
    assert ns.alignment(inside, basis) == pytest.approx(1.0, abs=1e-12)
    assert ns.alignment(orthogonal, basis) == pytest.approx(0.0, abs=1e-12)
    assert ns.alignment(inside.float() * 7, basis) == pytest.approx(1.0, abs=1e-6)
    assert ns.max_cosine(-3 * basis[:, 2], basis) == pytest.approx(1.0, abs=1e-12)
    assert ns.max_cosine(orthogonal, basis) == pytest.approx(0.0, abs=1e-12)
    assert ns.max_cosine(inside, basis) < 1.0


def test_alignment_rejects_zero_and_wrong_width(planted):
    basis, _ = ns.null_space(planted[0], K)
    with pytest.raises(ValueError, match="non-zero"):
        ns.alignment(torch.zeros(HIDDEN), basis)
    with pytest.raises(ValueError, match="basis hidden"):
        ns.alignment(torch.ones(HIDDEN + 1), basis)


def test_ones_direction_alignment():
    hidden = 16
    ones = torch.ones(hidden, 1, dtype=torch.float64) / math.sqrt(hidden)
    assert ns.ones_direction_alignment(ones) == pytest.approx(1.0, abs=1e-12)
    basis = torch.linalg.qr(ns.projector_complement(ones)[:, :3])[0]
    assert ns.ones_direction_alignment(basis) == pytest.approx(0.0, abs=1e-12)


def test_random_vectors_and_subspace_are_seeded_and_normalized():
    vectors = ns.random_unit_vectors(50, 32, seed=3)
    assert vectors.dtype == torch.float64 and vectors.shape == (50, 32)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(50, dtype=torch.float64))
    assert torch.equal(vectors, ns.random_unit_vectors(50, 32, seed=3))
    assert not torch.equal(vectors, ns.random_unit_vectors(50, 32, seed=4))
    basis = ns.random_subspace(32, 5, seed=1)
    torch.testing.assert_close(basis.T @ basis, torch.eye(5, dtype=torch.float64))
    assert torch.equal(basis, ns.random_subspace(32, 5, seed=1))


def test_random_baseline_matches_sqrt_k_over_d():
    hidden, k, n = 256, 32, 4000
    basis = ns.random_subspace(hidden, k, seed=7)
    rhos = (ns.random_unit_vectors(n, hidden, seed=8) @ basis).norm(dim=1)
    # E[ρ²] = k/d exactly; E[ρ] sits just below √(k/d) (Jensen), about 1% here.
    assert float((rhos**2).mean()) == pytest.approx(k / hidden, rel=0.03)
    assert float(rhos.mean()) == pytest.approx(math.sqrt(k / hidden), rel=0.03)


def test_alignment_report(planted):
    basis, _ = ns.null_space(planted[0], K)
    n_random = 500
    inside = basis.sum(dim=1)
    report = ns.alignment_report(inside, basis, {3: inside, 5: basis[:, 0]}, n_random=n_random)
    assert set(report) == {
        "k", "hidden", "rho", "rho_baseline", "rho_random_mean", "rho_random_std",
        "p_value", "max_cosine", "rho_per_layer",
    }  # fmt: skip
    assert (report["k"], report["hidden"]) == (K, HIDDEN)
    assert report["rho"] == pytest.approx(1.0)
    assert report["rho_baseline"] == pytest.approx(math.sqrt(K / HIDDEN))
    assert report["rho_random_mean"] == pytest.approx(math.sqrt(K / HIDDEN), rel=0.1)
    assert report["rho_random_std"] > 0
    assert report["p_value"] == pytest.approx(1 / (1 + n_random))
    assert report["rho_per_layer"] == pytest.approx({3: 1.0, 5: 1.0})
    random_direction = ns.random_unit_vectors(1, HIDDEN, seed=99)[0]
    assert ns.alignment_report(random_direction, basis, n_random=n_random)["p_value"] > 0.05


def test_alignment_report_is_seeded(planted):
    basis, _ = ns.null_space(planted[0], K)
    direction = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(0))
    assert ns.alignment_report(direction, basis, seed=2) == ns.alignment_report(
        direction, basis, seed=2
    )


# --- truncation -------------------------------------------------------------------------------


def test_truncate_with_empty_basis_is_identity():
    residual = torch.randn(2, 3, HIDDEN).to(torch.bfloat16)
    out = ns.truncate(residual, torch.zeros(HIDDEN, 0, dtype=torch.float64))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, residual)


def test_zero_ablation_removes_span_component(planted):
    basis, _ = ns.null_space(planted[0], K)
    residual = torch.randn(5, 7, HIDDEN, dtype=torch.float64)
    out = ns.truncate(residual, basis)
    assert out.shape == residual.shape and out.dtype == torch.float64
    torch.testing.assert_close(out @ basis, torch.zeros(5, 7, K, dtype=torch.float64))
    p = ns.projector_complement(basis)
    torch.testing.assert_close(out @ p, residual @ p)  # the complement is untouched
    torch.testing.assert_close(out, residual @ p)


def test_mean_ablation_restores_mean_component(planted):
    basis, _ = ns.null_space(planted[0], K)
    residual = torch.randn(4, HIDDEN, dtype=torch.float64)
    mean = torch.randn(HIDDEN, dtype=torch.float64)
    out = ns.truncate(residual, basis, mean=mean)
    torch.testing.assert_close(out @ basis, (mean @ basis).expand(4, K))
    p = ns.projector_complement(basis)
    torch.testing.assert_close(out @ p, residual @ p)
    with pytest.raises(ValueError, match="mean must have shape"):
        ns.truncate(residual, basis, mean=mean[:-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_truncate_preserves_dtype(planted, dtype):
    basis, _ = ns.null_space(planted[0], K)
    residual = torch.randn(3, HIDDEN).to(dtype)
    out = ns.truncate(residual, basis, mean=torch.zeros(HIDDEN, dtype=dtype))
    assert out.dtype == dtype
    tolerance = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    assert float((out.double() @ basis).abs().max()) < tolerance


# --- resolve_k --------------------------------------------------------------------------------


def test_subspace_maths_is_reexported():
    """ρ, projection and the random baselines live in calibrate.core.subspace; the null-space
    module re-exports them, so ``nullspace.<name>`` (studies, bench) keeps working."""
    for name in ("resolve_k", "DEFAULT_FRACTION", "projector_complement", "truncate", "alignment",
                 "max_cosine", "ones_direction_alignment", "random_unit_vectors",
                 "random_subspace", "alignment_report"):
        assert getattr(ns, name) is getattr(subspace, name)


def test_resolve_k():
    assert ns.resolve_k(4096) == 41  # 1% by default
    assert ns.resolve_k(576) == 6
    assert ns.resolve_k(50) == 1  # never rounds to an empty subspace
    assert ns.resolve_k(4096, k=40) == 40  # k wins over fraction
    assert ns.resolve_k(4096, k=0) == 0
    assert ns.resolve_k(100, fraction=1.0) == 100


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": -1}, r"k must be in \[0, hidden=64\], got -1"),
        ({"k": 65}, r"k must be in \[0, hidden=64\], got 65"),
        ({"fraction": 0.0}, r"fraction must be in \(0, 1\], got 0.0"),
        ({"fraction": 1.5}, r"fraction must be in \(0, 1\], got 1.5"),
        ({"fraction": None}, "either k or fraction"),
    ],
)
def test_resolve_k_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ns.resolve_k(64, **kwargs)


@pytest.mark.parametrize("key, value, message", [
    ("k", -1, "nullspace.k=-1; accepted: null or an integer >= 0"),
    ("k", 2.5, "nullspace.k=2.5; accepted: null or an integer >= 0"),
    ("fraction", 0, "nullspace.fraction=0; accepted: a number in (0, 1]"),
    ("fraction", 1.5, "nullspace.fraction=1.5; accepted: a number in (0, 1]"),
    ("n_random", 0, "nullspace.n_random=0; accepted: an integer >= 1"),
    ("n_control", -1, "nullspace.n_control=-1; accepted: an integer >= 0"),
    ("seed", "x", "nullspace.seed='x'; accepted: an integer >= 0"),
])
def test_nullspace_settings_are_checked(key, value, message):
    from calibrate.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        ns.NullspaceSettings(**{key: value})
    assert str(err.value) == message


def test_nullspace_settings_k_for_and_shape():
    from calibrate.errors import ConfigError

    assert ns.NullspaceSettings().k_for(576) == 6  # round(0.01 * 576)
    assert ns.NullspaceSettings(fraction=0.5).k_for(10) == 5
    assert ns.NullspaceSettings(k=40).k_for(4096) == 40  # k wins over fraction
    assert ns.NullspaceSettings(k=0, n_control=0).k_for(64) == 0
    ns.NullspaceSettings(k=576).check_shape(576)
    with pytest.raises(ConfigError, match=r"nullspace.k=577; accepted: 0..576 \(the hidden size\)"):
        ns.NullspaceSettings(k=577).check_shape(576)


def test_resolve_k_rejects_bad_hidden():
    with pytest.raises(ValueError, match="hidden must be >= 1, got 0"):
        ns.resolve_k(0)


# --- hashing and cache ------------------------------------------------------------------------


def test_weights_hash_across_dtypes(planted):
    weight = planted[0]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = weight.to(dtype)
        digest = ns.weights_hash(w)
        assert len(digest) == 64 and digest == ns.weights_hash(w.clone())
        changed = w.clone()
        changed[0, 0] += 1
        assert ns.weights_hash(changed) != digest
    # a non-contiguous view hashes its values, like its contiguous copy
    assert ns.weights_hash(weight.T) == ns.weights_hash(weight.T.contiguous())


def _entries(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / cache.CACHE_SUBDIR).iterdir())


def _forbid_recompute(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("gram_matrix called: the cache was not used")

    monkeypatch.setattr(ns, "gram_matrix", fail)


def test_cache_second_call_loads_from_disk(planted, tmp_path, monkeypatch):
    weight = planted[0].float()
    basis, sigma = cache.cached_null_space(weight, K, tmp_path)
    reference, reference_sigma = ns.null_space(weight, K)
    assert torch.equal(basis, reference) and torch.equal(sigma, reference_sigma)
    (entry,) = _entries(tmp_path)
    assert entry.name == f"{ns.weights_hash(weight)}.safetensors"
    _forbid_recompute(monkeypatch)
    again, again_sigma = cache.cached_null_space(weight, K, tmp_path)
    assert torch.equal(again, basis) and torch.equal(again_sigma, sigma)
    other_k, _ = cache.cached_null_space(weight, 2 * K, tmp_path)  # any k from the one entry
    assert torch.equal(other_k[:, :K], basis)


def test_cache_with_a_known_digest_reads_the_same_entry_without_hashing(planted, tmp_path,
                                                                          monkeypatch):
    """A job passes the loaded model's unembed_hash (tensor_hash: the same bytes' sha256):
    it names the same entry as weights_hash, and nothing is hashed again."""
    from calibrate.model.identity import tensor_hash

    weight = planted[0].float()
    basis, _ = cache.cached_null_space(weight, K, tmp_path)
    assert tensor_hash(weight) == ns.weights_hash(weight)
    _forbid_recompute(monkeypatch)
    monkeypatch.setattr(cache, "weights_hash", lambda w: pytest.fail("hashed again"))
    known, _ = cache.cached_null_space(weight, K, tmp_path, digest=tensor_hash(weight))
    assert torch.equal(known, basis) and len(_entries(tmp_path)) == 1


def test_cache_changed_weights_recompute(planted, tmp_path, monkeypatch):
    weight = planted[0].float()
    cache.cached_null_space(weight, K, tmp_path)
    changed = weight.clone()
    changed[1, 2] += 0.5
    calls = []
    original = ns.gram_matrix
    monkeypatch.setattr(ns, "gram_matrix", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    basis, _ = cache.cached_null_space(changed, K, tmp_path)
    assert calls == [1]
    assert len(_entries(tmp_path)) == 2
    torch.testing.assert_close(basis, ns.null_space(changed, K)[0], atol=0, rtol=0)


def test_cache_corrupted_file_is_rebuilt(planted, tmp_path, monkeypatch):
    weight = planted[0].float()
    basis, _ = cache.cached_null_space(weight, K, tmp_path)
    (entry,) = _entries(tmp_path)
    entry.write_bytes(b"\x00garbage, not a safetensors file" * 10)
    rebuilt, _ = cache.cached_null_space(weight, K, tmp_path)
    assert torch.equal(rebuilt, basis)
    assert _entries(tmp_path) == [entry]  # rewritten in place, no temp files left
    _forbid_recompute(monkeypatch)
    assert torch.equal(cache.cached_null_space(weight, K, tmp_path)[0], basis)


def test_cache_entry_with_wrong_metadata_is_rebuilt(planted, tmp_path):
    weight = planted[0].float()
    basis, _ = cache.cached_null_space(weight, K, tmp_path)
    (entry,) = _entries(tmp_path)
    # a valid safetensors file under this name, but written for other weights
    other = planted_weight(seed=1)[0].float()
    cache._save_entry(entry, *ns.eigendecomposition(other), cache._metadata(other, "0" * 64))
    rebuilt, _ = cache.cached_null_space(weight, K, tmp_path)
    assert torch.equal(rebuilt, basis)
    assert _entries(tmp_path) == [entry]


def test_cache_write_leaves_no_temp_on_failure(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cache, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cache.cached_null_space(torch.randn(40, 8), 2, tmp_path)
    assert _entries(tmp_path) == []
