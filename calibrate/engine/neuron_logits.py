"""Ablations in the last block read in logit space: every arm's full-vocabulary log-softmax at
the last layer without a [states, hidden] x [hidden, vocab] product per arm.

An arm whose neurons all lie in the last block changes a state x (the last layer's residual)
by ``Δ = α·u + Σ_i β_i v_i``: without a post-MLP norm ``v_i = w_i`` (the neuron's output
weight), ``β_i = s_i (μ_i − a_i)`` and α = 0; with one (Gemma-2/3: ``post(z) = g⊙c(z)/σ(z) + b``
on the MLP output m, δ = Σ β_i w_i) ``u = g⊙c(m)``, ``v_i = g⊙c(w_i)``, ``α = 1/σ(m + δ) − 1/σ(m)``
and ``β_i = s_i (μ_i − a_i)/σ(m + δ)``. The final norm ``G⊙C(y)/S(y) + B`` is linear but for its
scale S (:class:`calibrate.model.adapters.NormAffine`), so the logits of ``x + Δ`` are

    ``(P_x + α·U + Σ_i β_i L_i) / S + const``,  P_x = W(G⊙C(x)), U = W(G⊙C(u)), L_i = W(G⊙C(v_i)),

with ``const = W·B`` plus the unembedding's bias, and soft-capping after; the total effect
divides by ``S(x + Δ)`` (computed in the hidden space), the direct effect by ``S(x)``. P_x and U
are one product per state, L_i one per neuron for the whole pass; each arm then costs a few
passes over [states, vocab].
"""

from __future__ import annotations

import numpy as np
import torch

from calibrate.engine.neuron_ablation import NeuronArms
from calibrate.engine.readout import Readout
from calibrate.model.adapters import NormAffine, final_norm_affine, mlp_parts, norm_affine
from calibrate.model.load import LoadedModel


class LastBlockLogits:
    """The arms of ``arms`` whose lowest block is the last, read in logit space through the
    logit lens ``lens`` (its final norm, unembedding, bias and soft-capping)."""

    def __init__(self, loaded: LoadedModel, lens: Readout, arms: NeuronArms) -> None:
        adapter = loaded.adapter
        self.block = block = adapter.num_blocks
        self.lens, self.arms = lens, arms
        self.final: NormAffine = final_norm_affine(adapter)
        parts = mlp_parts(adapter, block)
        self.post: NormAffine | None = (None if parts.post_norm is None
                                        else norm_affine(adapter.model_type, parts.post_norm))
        device = lens.device
        raw = parts.out_weight.detach().float().to(device)  # [d_mlp, H]
        self.arm_ids = np.flatnonzero(arms.lowest == block)
        scale = arms.scale[block][self.arm_ids]
        used = np.unique(arms.idx[block][self.arm_ids][scale != 0])
        self.local = np.full(raw.shape[0], -1, dtype=np.int64)
        self.local[used] = np.arange(len(used))
        self.raw = raw[torch.as_tensor(used, device=device)]  # [n, H]
        self.v = self.raw if self.post is None else self.post.linear(self.raw)
        self.mu = torch.as_tensor(arms.means[block], dtype=torch.float32, device=device)
        self.logits_v = self._logits(self.v)  # [n, V]
        const = torch.zeros(lens.weight.shape[0], device=device)
        if self.final.bias is not None:
            const = const + self._matmul(self.final.bias.to(device)[None])[0]
        if getattr(lens, "bias", None) is not None:
            const = const + lens.bias.to(device)
        self.const = const

    def _matmul(self, h: torch.Tensor) -> torch.Tensor:
        """``h @ Wᵀ`` [R, V] in float32, over vocabulary chunks."""
        weight = self.lens.weight
        step = getattr(self.lens, "vocab_chunk", 32768)
        return torch.cat([h @ weight[i:i + step].float().T
                          for i in range(0, weight.shape[0], step)], dim=1)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """``W(G⊙C(h))`` [R, V] for hidden vectors h [R, H]."""
        return self._matmul(self.final.linear(h.float()))

    def read(self, x: torch.Tensor, acts: torch.Tensor, outputs: torch.Tensor | None,
             token_state: torch.Tensor, token_target: torch.Tensor, direct: bool,
             chunk: int = 64, inner: int = 16) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probabilities [A', M] (total; and direct, or None) of the target tokens under
        each of ``self.arm_ids``: x [S, H] the last layer's states, acts [S, d_mlp] the last
        block's activations there, outputs [S, H] its MLP output (post-MLP norm only); token m
        is ``token_target[m]`` read at state ``token_state[m]``."""
        device = self.lens.device
        x, acts = x.to(device, torch.float32), acts.to(device, torch.float32)
        outputs = None if outputs is None else outputs.to(device, torch.float32)
        token_state, token_target = token_state.to(device), token_target.to(device)
        n_arm = len(self.arm_ids)
        total = torch.empty((n_arm, len(token_state)), dtype=torch.float64, device=device)
        frozen = torch.empty_like(total) if direct else None
        idx_all = self.arms.idx[self.block][self.arm_ids]
        scale_all = self.arms.scale[self.block][self.arm_ids]
        for start in range(0, x.shape[0], chunk):
            xs = x[start:start + chunk]
            p_x = self._logits(xs)  # [c, V]: one vocabulary product per state
            u_logits = u = s_m = None
            if self.post is not None:
                m_all = outputs[start:start + chunk]
                u = self.post.linear(m_all)
                u_logits, s_m = self._logits(u), self.post.scale(m_all)
            # the arms over a few states at a time: their [rows, V] passes stay in cache
            # (measured 3x faster than 64 rows at a 262k vocabulary)
            for lo in range(0, len(xs), inner):
                hi = min(lo + inner, len(xs))
                sel = ((token_state >= start + lo) & (token_state < start + hi)).nonzero().squeeze(1)
                if not len(sel):
                    continue
                local, target = token_state[sel] - start - lo, token_target[sel]
                part = slice(lo, hi)
                self._arms(xs[part], acts[start + lo:start + hi], p_x[part],
                           None if u is None else (outputs[start + lo:start + hi], u[part],
                                                   u_logits[part], s_m[part]),
                           sel, local, target, idx_all, scale_all, total, frozen)
        return total, frozen

    def _arms(self, xs: torch.Tensor, acts: torch.Tensor, p_x: torch.Tensor, post: tuple | None,
              sel: torch.Tensor, local: torch.Tensor, target: torch.Tensor, idx_all: np.ndarray,
              scale_all: np.ndarray, total: torch.Tensor, frozen: torch.Tensor | None) -> None:
        """Every arm's log-probabilities of the tokens ``sel`` (read at rows ``local`` of the
        states ``xs``), written into ``total`` / ``frozen``."""
        device = xs.device
        s_x = self.final.scale(xs)
        for j in range(len(self.arm_ids)):
            keep = scale_all[j] != 0
            neurons = torch.as_tensor(idx_all[j][keep], device=device)
            s = torch.as_tensor(scale_all[j][keep], dtype=torch.float32, device=device)
            rows = torch.as_tensor(self.local[idx_all[j][keep]], device=device)
            coef = s * (self.mu[neurons] - acts[:, neurons])  # [c, n]
            alpha = None
            if post is None:
                beta = coef
                delta = beta @ self.v[rows]
            else:
                m, u, u_logits, s_m = post
                s_new = self.post.scale(m + coef @ self.raw[rows])  # [c, 1]
                alpha, beta = 1.0 / s_new - 1.0 / s_m, coef / s_new
                delta = alpha * u + beta @ self.v[rows]
            num = torch.addmm(p_x, beta, self.logits_v[rows])
            if alpha is not None:
                num.addcmul_(alpha.expand_as(num), u_logits)
            total[j, sel] = self._logprob(num, 1.0 / self.final.scale(xs + delta), local, target)
            if frozen is not None:
                frozen[j, sel] = self._logprob(num, 1.0 / s_x, local, target)

    def _logprob(self, num: torch.Tensor, inv_scale: torch.Tensor, local: torch.Tensor,
                 target: torch.Tensor) -> torch.Tensor:
        """log-softmax at ``target`` of ``num · inv_scale + const`` (soft-capped), rows ``local``."""
        logits = torch.addcmul(self.const[None], num, inv_scale)
        cap = getattr(self.lens, "softcap", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        lse = torch.logsumexp(logits, dim=-1).double()
        return logits[local, target].double() - lse[local]
