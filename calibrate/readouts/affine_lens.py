"""``lens=affine``: the closed-form linear shortcut to the last layer (Din et al. 2023, "Jump to
Conclusions"), fit by ridge least squares on unlabelled tokens; no gradient descent.

For every layer ℓ below the last, ``W_ℓ, b_ℓ = argmin Σ_t ‖h_L(t) − (h_ℓ(t) + W_ℓ h_ℓ(t) +
b_ℓ)‖² + λ_ℓ ‖W_ℓ‖²`` over the training tokens t (every position), i.e. the least-squares map of
h_ℓ to h_L in residual form, shrunk toward the identity (the logit lens) rather than toward 0;
the intercept is not penalised. ``λ_ℓ = lens.ridge × tr(C_ℓ) / H`` with C_ℓ the centred
covariance of h_ℓ, so the strength means the same at every layer and model. Then h_ℓ is read as
h_L is: the model's own final norm and unembedding
(:class:`~calibrate.readouts.translators.TranslatedLens`; the last layer as the model reads it).

The tokens are the tuned lens's (:mod:`.tuned_lens`): the calibration split's prompts (or
``lens.text_path``), the same seeded held-out sequences and the same ``lens.max_tokens``
sample, so ``lens=affine`` and ``lens=tuned`` with the same seed fit on the same positions. The
sums are accumulated batch by batch (:class:`RidgeSums`: float32 products, float64 for positions
with a massive activation, float64 totals, on residuals shifted by the first batch's medians),
never holding every residual at once; the normal equations are solved in float64. Cached and
saved like the tuned lens (its file format, ``<cache>/lenses/affine/``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from calibrate import values
from calibrate.engine.lens import LogitLens
from calibrate.readouts import lens_cache, lens_text
from calibrate.readouts.readout_kind import ReadoutKind, ReadoutSource, register_readout
from calibrate.readouts.translators import TranslatedLens, save_lens
from calibrate.readouts.tuned_lens import (
    cached_fit,
    check_held_out,
    check_text_path,
    fit_summary,
    held_out_residuals,
    kl_report,
    lap,
)

LOG = logging.getLogger("calibrate")
# A position whose residual norm is this many times the batch's median has its ridge products
# summed in float64 (numerical precision only: the fit's objective does not depend on it).
HEAVY_NORM = 4.0


@dataclass
class AffineLensSettings:
    """``lens=affine``: the ridge strength and the tokens it is fit on."""

    name: str = "affine"
    ridge: float = 0.001  # λ_ℓ = ridge x tr(C_ℓ) / H (C_ℓ: the centred covariance of h_ℓ)
    text_path: str | None = None  # fit on this text file instead of the calibration prompts
    max_tokens: int = 16384  # positions used (a seeded sample when the text has more)
    holdout_fraction: float = 0.1  # sequences held out for the reported KL
    kl_tokens: int = 256  # held-out positions the per-layer KL is measured on
    max_length: int = 512  # text_path: tokens per sequence
    seed: int | None = None  # null: the job's seed

    def __post_init__(self) -> None:
        values.choice("lens", self.name, ("affine",))
        values.number("lens.ridge", self.ridge, lambda v: v > 0, "a number > 0")
        self.text_path = check_text_path("lens.text_path", self.text_path)
        values.integer("lens.max_tokens", self.max_tokens, 1)
        check_held_out(self)

    def fitting(self) -> dict[str, Any]:
        """The settings that decide the fit (its cache key)."""
        return {k: v for k, v in asdict(self).items() if k not in ("name", "text_path")}


class RidgeSums:
    """Running sums of h_ℓ and of its products with itself and with h_L, for every layer ℓ < L,
    on residuals shifted by the first batch's coordinate-wise medians (so nothing cancels).

    The products of a batch are summed in float32, except those of positions whose residual is
    ``HEAVY_NORM`` times the batch's median norm or more (a massive activation: SmolLM2's first
    position, |h| ~ 2.2e4 against ~900), which are summed in float64: in float32 their products
    swamp the small directions of the covariance. Every batch's sums are added in float64.
    On SmolLM2's real residuals (12,054 SST-2 tokens) the held-out per-layer KL of the fit is
    within 1.2e-6 nats (7e-7 relative) of all-float64 sums, and the sums take a third of the time.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift_x = self.shift_last = None
        self.sx = self.sg = self.sxx = self.sxg = None

    def add(self, residual: torch.Tensor) -> None:
        """Add residuals [n, L+1, H] (float32)."""
        x, last = residual[:, :-1], residual[:, -1]
        n, layers, hidden = x.shape
        if self.shift_x is None:
            self.shift_x, self.shift_last = x.median(0).values, last.median(0).values
            zeros = {"dtype": torch.float64, "device": x.device}
            self.sx, self.sg = torch.zeros((layers, hidden), **zeros), torch.zeros(hidden, **zeros)
            self.sxx = torch.zeros((layers, hidden, hidden), **zeros)
            self.sxg = torch.zeros((layers, hidden, hidden), **zeros)
        xs = (x - self.shift_x).float()  # [n, L, H]
        g = (last - self.shift_last).float()  # [n, H]: h_L shifted (the same for every layer)
        size = residual.norm(dim=-1).amax(1)  # [n]: each position's largest residual norm
        heavy = size >= HEAVY_NORM * size.median()
        if heavy.any():
            self._add_products(xs[heavy].double(), g[heavy].double())
            xs[heavy] = 0.0  # their float32 products below are 0
            g = torch.where(heavy[:, None], 0.0, g)
        self._add_products(xs, g)
        self.n += n

    def _add_products(self, xs: torch.Tensor, g: torch.Tensor) -> None:
        n, layers, hidden = xs.shape
        by_layer = xs.transpose(0, 1)  # [L, n, H]
        self.sx += xs.sum(0).double()
        self.sg += g.sum(0).double()
        self.sxx += torch.bmm(by_layer.transpose(1, 2), by_layer).double()
        self.sxg += (xs.reshape(n, -1).T @ g).view(layers, hidden, hidden).double()

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [L, H, H] out x in, bias [L, H]) of the ridge fit, float32."""
        n = self.n
        # h_L − h_ℓ shifted by shift_last − shift_x is g − xs: its sums follow from g's and xs's
        sd = self.sg[None] - self.sx
        sxd = self.sxg - self.sxx
        mx, md = self.sx / n, sd / n  # shifted means
        cxx = self.sxx / n - mx[:, :, None] * mx[:, None, :]
        cxd = sxd / n - mx[:, :, None] * md[:, None, :]
        hidden = cxx.shape[-1]
        lam = ridge * torch.diagonal(cxx, dim1=1, dim2=2).sum(-1) / hidden  # [L]
        eye = torch.eye(hidden, dtype=torch.float64, device=cxx.device)
        if not (torch.isfinite(cxx).all() and torch.isfinite(cxd).all()):
            raise ValueError("affine lens: the residual sums are not finite (a non-finite "
                             "residual in the training text's forward pass)")
        # one layer at a time (a batched LU of 30 such systems failed inside MKL on these
        # machines), Cholesky of the symmetric positive definite ridge system
        coef = torch.stack([torch.cholesky_solve(cxd[i], torch.linalg.cholesky(
            cxx[i] + lam[i] * eye)) for i in range(cxx.shape[0])])  # [L, in, out]
        weight = coef.transpose(1, 2)  # [L, out, in]
        mean_x = mx + self.shift_x.double()
        mean_d = md + (self.shift_last - self.shift_x).double()
        bias = mean_d - (weight @ mean_x[:, :, None])[..., 0]
        return weight.float().cpu(), bias.float().cpu()


@register_readout
class Affine(ReadoutKind):
    """Every layer below the last through its ridge map to the last layer, then the logit lens."""

    name = "affine"
    Settings = AffineLensSettings

    def fits_on_prompts(self, settings: AffineLensSettings) -> bool:
        return settings.text_path is None

    def build(self, settings: AffineLensSettings, source: ReadoutSource) -> TranslatedLens:
        adapter = source.loaded.adapter
        seed = source.seed if settings.seed is None else settings.seed
        text = lens_text.training_text(settings, source)
        key, identity, cached = cached_fit(self.name, source, text.digest,
                                           {**settings.fitting(), "seed": seed})
        if cached is not None:
            return cached
        clock = time.perf_counter()
        fit_idx, held_idx = lens_text.split_sequences(len(text.sequences),
                                                      settings.holdout_fraction, seed)
        fit_seqs = [text.sequences[i] for i in fit_idx]
        keep = lens_text.sample_positions([len(s) for s in fit_seqs], settings.max_tokens, seed)
        sums = RidgeSums()
        for batch in lens_text.residual_batches(source.loaded, fit_seqs, keep):
            sums.add(batch)
        weight, bias = sums.solve(settings.ridge)
        seconds = {}
        seconds["fit"], clock = lap(clock)
        readout = TranslatedLens(adapter, weight, bias, identity)
        held = held_out_residuals(source.loaded, text, held_idx, settings.kl_tokens, seed)
        kl = kl_report(LogitLens(adapter), readout, held, self.name)
        seconds["kl_report"], clock = lap(clock)
        summary = fit_summary(text, sums.n, source.loaded, kl, {
            "held_out_sequences": len(held_idx),
            "settings": {**settings.fitting(), "seed": seed}, "fit_seconds": seconds})
        folder = lens_cache.store(self.name, key, source.cache_dir, {"summary": summary},
                                  lambda tmp: save_lens(tmp, weight, bias,
                                                        base_model=source.loaded.source,
                                                        unembedding=adapter.unembed_weight,
                                                        revision=source.loaded.revision))
        readout._summary = {**summary, "cache": None if folder is None else str(folder)}
        return readout
