"""MLP neurons from the weights alone, and what their ablation did: the neurons study's maths.

Pure functions (numpy / torch, no model, no I/O) behind ``intervention=neurons``
(:mod:`calibrate.studies.neurons`), after Stolfo et al. (NeurIPS 2024), *Confidence Regulation
Neurons in Language Models*:

* **Weight statistics** of every neuron's output weight w (a row of the MLP's output projection,
  through the post-MLP norm's gain where the block has one): its norm ‖w‖, the fraction of its
  squared norm in U_k, the unembedding's bottom-k left singular subspace
  (:mod:`calibrate.core.nullspace`, the same k and the same convention as ρ(ĉ): W_U as loaded,
  the final norm's gain not folded in), and the variance over the vocabulary of its direct
  logit effect ``W_U (γ ⊙ C ŵ)`` (ŵ = w/‖w‖, γ the final norm's gain, C the centring of a
  LayerNorm), computed from the Gram matrix's eigendecomposition without a vocabulary-sized
  product. Entropy neurons have a large norm and write mostly into U_k, so their direct logit
  effect is small for their size.
* **Reference ranks**: each statistic's percentile among all neurons of the chosen blocks, the
  candidates' ranking (by ‖U_kᵀ w‖, the norm written into the null space) and the entropy flag
  (norm percentile and null-space fraction at or above thresholds).
* **Token frequency**: the correlation of a neuron's direct logit effect with log unigram
  frequency over the tokens seen in a text.
* **Matched-norm random neurons**: for each candidate, neurons of its block among the ``pool``
  non-candidates nearest to it in norm; one draw picks one per candidate (distinct), so a draw is
  both a random set matched to the top set and, one by one, a random neuron matched to each
  candidate. Their ablation is scaled by the norm ratio, so the output norm matches exactly.
* **ĉ in the candidates' span**: the share of ĉ's squared norm in the span of the candidates'
  output weights, against the same share for the random matched sets.
* **Effects**: per-variant metrics (vectorised over variants) and two-sided empirical p-values
  of an effect against the null's draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import xlogy

from calibrate.core.option_scores import option_probabilities
from calibrate.core.paired import binned_errors


@dataclass(frozen=True)
class WeightStats:
    """Per neuron (one row per neuron of the chosen blocks)."""

    norm: np.ndarray  # ‖w‖
    null_fraction: np.ndarray  # ‖U_kᵀ w‖² / ‖w‖²
    logit_var: np.ndarray  # Var_v[(W_U (γ ⊙ C ŵ))_v], ŵ unit

    @property
    def null_norm(self) -> np.ndarray:
        """‖U_kᵀ w‖: the norm written into the null space (the candidates' ranking score)."""
        return self.norm * np.sqrt(self.null_fraction)


def weight_statistics(weights: torch.Tensor, eigenvalues: torch.Tensor,
                      eigenvectors: torch.Tensor, k: int, gain: torch.Tensor, centre: bool,
                      mean_row: torch.Tensor, vocab: int) -> WeightStats:
    """Statistics of output weights ``weights`` [n, H].

    ``eigenvalues`` [H] (ascending) and ``eigenvectors`` [H, H] are those of W_Uᵀ W_U
    (:func:`calibrate.core.nullspace.eigendecomposition`): U_k is the first k columns, and the
    vocabulary variance of W_U u is ``uᵀ G u / V − (m · u)²`` with G = Q Λ Qᵀ and m the mean
    row of W_U [H] (``mean_row``). ``gain`` [H] and ``centre`` describe the final norm (a
    LayerNorm centres first)."""
    w = weights.to(torch.float64)
    q, lam = eigenvectors.to(torch.float64), eigenvalues.to(torch.float64).clamp(min=0)
    norm = w.norm(dim=1)
    coords = w @ q  # [n, H] coordinates in the eigenbasis
    null = (coords[:, :k] ** 2).sum(1) / norm.clamp(min=1e-300) ** 2
    unit = w / norm.clamp(min=1e-300)[:, None]
    if centre:
        unit = unit - unit.mean(1, keepdim=True)
    u = unit * gain.to(torch.float64)[None]
    second = ((u @ q) ** 2 * lam[None]).sum(1) / vocab
    first = u @ mean_row.to(torch.float64)
    return WeightStats(norm.numpy(), null.numpy(), (second - first ** 2).clamp(min=0).numpy())


def percentiles(values: np.ndarray) -> np.ndarray:
    """Each value's share of all values at or below it (ties share the highest), in (0, 1]."""
    values = np.asarray(values, dtype=np.float64)
    ordered = np.sort(values)
    return np.searchsorted(ordered, values, side="right") / len(values)


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x − median) / (1.4826 · MAD): how far a neuron stands out of the distribution."""
    values = np.asarray(values, dtype=np.float64)
    median = np.median(values)
    mad = 1.4826 * np.median(np.abs(values - median))
    return (values - median) / (mad if mad > 0 else np.inf)


def entropy_flags(norm_percentile: np.ndarray, null_fraction: np.ndarray,
                  norm_quantile: float, min_null_fraction: float) -> np.ndarray:
    """Entropy-neuron candidates: norm at or above the ``norm_quantile`` of all neurons and at
    least ``min_null_fraction`` of the squared norm in U_k."""
    return (np.asarray(norm_percentile) >= norm_quantile) & \
        (np.asarray(null_fraction) >= min_null_fraction)


def top_indices(score: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` largest scores' indices, largest first (ties: the lower index first)."""
    order = np.lexsort((np.arange(len(score)), -np.asarray(score, dtype=np.float64)))
    return order[:n]


# --- token frequency ---------------------------------------------------------------------------


def token_counts(token_ids: Sequence[Sequence[int]], vocab: int) -> np.ndarray:
    """How often each of ``vocab`` token ids occurs in the tokenized texts [vocab]."""
    flat = np.fromiter((t for seq in token_ids for t in seq), dtype=np.int64)
    return np.bincount(flat[(flat >= 0) & (flat < vocab)], minlength=vocab)


def frequency_correlation(effects: torch.Tensor, counts: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``effects`` [n, S] (a neuron's direct logit effect on
    S tokens) with log frequency of those tokens (``counts`` [S], each >= 1)."""
    logf = torch.as_tensor(np.log(np.asarray(counts, dtype=np.float64)))
    if len(logf) < 3 or float(logf.std()) == 0.0:
        return np.full(effects.shape[0], np.nan)
    x = effects.to(torch.float64)
    x = x - x.mean(1, keepdim=True)
    y = (logf - logf.mean()).to(x.device)
    denom = x.norm(dim=1) * y.norm()
    return ((x @ y) / denom.clamp(min=1e-300)).cpu().numpy()


# --- random neurons of matched norm ------------------------------------------------------------


def matched_pools(norms: np.ndarray, blocks: np.ndarray, candidates: np.ndarray,
                  pool: int) -> list[np.ndarray]:
    """For each candidate: the ``pool`` neurons of its block nearest to it in norm, candidates
    left out (fewer where the block has fewer)."""
    taken = np.zeros(len(norms), dtype=bool)
    taken[candidates] = True
    out = []
    for c in candidates:
        same = np.flatnonzero((blocks == blocks[c]) & ~taken)
        gap = np.abs(norms[same] - norms[c])
        out.append(same[np.lexsort((same, gap))][:pool])
    return out


def matched_draws(pools: Sequence[np.ndarray], n_draws: int, seed: int) -> np.ndarray:
    """[n_draws, m] neuron indices: in each draw one neuron from each candidate's pool, all
    distinct within the draw (seeded)."""
    rng = np.random.default_rng(seed)
    draws = np.empty((n_draws, len(pools)), dtype=np.int64)
    for d in range(n_draws):
        chosen: set[int] = set()
        for j, members in enumerate(pools):
            left = [int(m) for m in members if int(m) not in chosen]
            if not left:
                raise ValueError(f"candidate {j}'s pool of matched neurons is used up; a larger "
                                 "pool or fewer candidates are needed")
            pick = left[int(rng.integers(len(left)))]
            chosen.add(pick)
            draws[d, j] = pick
    return draws


def span_share(vector: np.ndarray, vectors: np.ndarray) -> float:
    """Share of ``vector``'s squared norm in the span of the rows of ``vectors`` [m, H]."""
    v = np.asarray(vector, dtype=np.float64)
    basis, _ = np.linalg.qr(np.asarray(vectors, dtype=np.float64).T)  # [H, m]
    return float(np.sum((basis.T @ v) ** 2) / max(float(v @ v), 1e-300))


def span_null(vector: np.ndarray, weights: np.ndarray, candidates: np.ndarray,
              draws: np.ndarray) -> dict[str, float]:
    """ĉ's share in the candidates' span against the same share for each matched random set
    (``draws`` [n, m] rows of ``weights``): the share, the null's mean and 5–95 % band, the
    one-sided p-value ``(1 + #{null >= share}) / (1 + n)`` and the share a random subspace of
    that dimension would hold on average (m / H)."""
    share = span_share(vector, weights[candidates])
    null = np.array([span_share(vector, weights[d]) for d in draws])
    lo, median, hi = np.quantile(null, [0.05, 0.5, 0.95])
    return {"share": share, "null_mean": float(null.mean()), "null_median": float(median),
            "null_p05": float(lo), "null_p95": float(hi), "n_draws": len(null),
            "p_value": float((1 + np.sum(null >= share)) / (1 + len(null))),
            "random_subspace": len(candidates) / weights.shape[1]}


def cosines(vector: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Cosine of ``vector`` [H] with each row of ``weights`` [n, H]."""
    v = np.asarray(vector, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    return (w @ v) / np.maximum(np.linalg.norm(w, axis=1) * np.linalg.norm(v), 1e-300)


# --- effects -----------------------------------------------------------------------------------


EFFECT_METRICS = ("accuracy", "confidence", "ece", "mce", "entropy")


def variant_metrics(logits: np.ndarray, labels: np.ndarray, n_bins: int,
                    binning: str) -> dict[str, np.ndarray]:
    """accuracy, mean confidence, ECE, MCE and mean option entropy of option logits
    [..., N, K], vectorised over the leading axes."""
    lead = logits.shape[:-2]
    probs = option_probabilities(logits.reshape(-1, *logits.shape[-2:]))
    conf, right = probs.max(-1), probs.argmax(-1) == np.asarray(labels)
    ece, mce = binned_errors(conf, right, n_bins, binning)
    entropy = -xlogy(probs, probs).sum(-1)
    return {"accuracy": right.mean(-1).reshape(lead), "confidence": conf.mean(-1).reshape(lead),
            "ece": ece.reshape(lead), "mce": mce.reshape(lead),
            "entropy": entropy.mean(-1).reshape(lead)}


def example_entropy(logits: np.ndarray) -> np.ndarray:
    """Option entropy of every example: option logits [..., K] -> [...] (nats)."""
    probs = option_probabilities(logits)
    return -xlogy(probs, probs).sum(-1)


def abs_entropy_change(base: np.ndarray, arms: np.ndarray) -> np.ndarray:
    """Mean over examples of |entropy(arm) − entropy(base)|: base [N, K], arms [..., N, K] ->
    [...]. Where the mean Δentropy cancels (an ablation sharpens some answers and flattens
    others), this does not."""
    return np.abs(example_entropy(arms) - example_entropy(base)).mean(-1)


def null_p_value(observed: float, null: np.ndarray) -> float:
    """Two-sided empirical p-value of ``observed`` against the null's draws, about the null's
    median: ``(1 + #{|null − med| >= |observed − med|}) / (1 + n)``."""
    null = np.asarray(null, dtype=np.float64)
    med = float(np.median(null))
    return float((1 + np.sum(np.abs(null - med) >= abs(observed - med))) / (1 + len(null)))


def null_summary(observed: dict[str, float], null: dict[str, np.ndarray]) -> dict[str, float]:
    """Per metric: the null's median and 5–95 % band and ``observed``'s p-value."""
    out: dict[str, float] = {}
    for metric, values in null.items():
        lo, median, hi = np.quantile(values, [0.05, 0.5, 0.95])
        out.update({f"null_delta_{metric}_median": float(median),
                    f"null_delta_{metric}_p05": float(lo), f"null_delta_{metric}_p95": float(hi),
                    f"p_value_{metric}": null_p_value(observed[metric], values)})
    return out


def effect_table(base: np.ndarray, arms: np.ndarray, labels: np.ndarray, names: Sequence[str],
                 layers: Sequence[int], effect: str, n_bins: int, binning: str, n_boot: int,
                 alpha: float, seed: int) -> list[dict]:
    """Rows (one per arm and layer) of an ablation's effect: the arm's metrics
    (:data:`EFFECT_METRICS`), their deltas against ``base`` and, with ``n_boot`` > 0, paired
    bootstrap intervals of every delta (:func:`calibrate.core.paired.paired_intervals`); the
    share of examples whose answer changed and the mean absolute per-example entropy change
    (:func:`abs_entropy_change`). ``base`` [N, n, K] and ``arms`` [A, N, n, K] are option logits
    at ``layers``."""
    from calibrate.core.paired import paired_intervals

    ref = variant_metrics(np.moveaxis(base, 1, 0), labels, n_bins, binning)  # each [n]
    base_probs = option_probabilities(base)
    rows = []
    for a, name in enumerate(names):
        probs = option_probabilities(arms[a])
        got = variant_metrics(np.moveaxis(arms[a], 1, 0), labels, n_bins, binning)
        changed = (probs.argmax(-1) != base_probs.argmax(-1)).mean(0)
        moved = abs_entropy_change(np.moveaxis(base, 1, 0), np.moveaxis(arms[a], 1, 0))
        ci = None
        if n_boot:
            ci = paired_intervals(base_probs, probs, labels, n_boot, alpha, seed, n_bins, binning,
                                  metrics=EFFECT_METRICS)
        for i, layer in enumerate(layers):
            row = {"arm": name, "effect": effect, "layer": int(layer)}
            row.update({m: float(got[m][i]) for m in EFFECT_METRICS})
            row.update({f"delta_{m}": float(got[m][i] - ref[m][i]) for m in EFFECT_METRICS})
            row["changed"] = float(changed[i])
            row["abs_delta_entropy"] = float(moved[i])
            if ci is not None:
                row.update({k: (bool(v) if k.startswith("significant") else float(v))
                            for k, v in ci.iloc[i].items()})
            rows.append(row)
    return rows
