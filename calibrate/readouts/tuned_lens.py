"""``lens=tuned``: the tuned lens (Belrose et al. 2023), trained without labels, or loaded.

One affine translator per layer below the last, in residual form ``h + W_ℓ h + b_ℓ``, zero
(identity) initialised, read through the model's own final norm and unembedding
(:class:`~calibrate.readouts.translators.TranslatedLens`); the last layer has none. Trained with
the tuned lens's objective: at every token position of the training text, the mean over tokens
of KL(the model's final-layer next-token distribution ‖ the lens's distribution at layer ℓ),
summed over layers ℓ < L. No label is read.

* Training text: the job's calibration split's prompts (default; never an evaluated row), or
  ``lens.text_path``. ``lens.max_tokens`` positions (a seeded uniform sample; all when fewer)
  of the sequences not held out are kept as residuals [tokens, L+1, H]; every step draws
  ``lens.tokens_per_step`` of them. ``lens.holdout_fraction`` of the sequences are held out and
  ``lens.kl_tokens`` of their positions give the per-layer KL reported in metrics.json (the
  logit lens's and the tuned lens's, float32, full vocabulary).
* Optimiser: ``lens.optimizer`` ``sgd`` (the library's: Nesterov momentum, learning rate
  ``lr × (1 − momentum)``, weight decay, gradient norm clipped at ``lens.clip``, linear decay to
  0 over ``lens.steps``) or ``adam`` (same clipping and decay). The bias is trained in units of
  the layer's RMS residual (b = s_ℓ b′, s_ℓ measured on the training tokens) so a step means the
  same at every layer of every model; what is saved is b. The unembedding matmuls of training
  run in ``lens.train_dtype`` (bfloat16 by default, as the library's autocast; ~4x faster on
  CPUs with bf16 units); every read and every reported KL is float32.
* Cache: ``<cache>/lenses/tuned/<key>/`` in the library's format (``config.json`` +
  ``params.pt``) plus ``fit.json``; the key hashes the weights fingerprint and dtype, the
  training tokens and the settings, and is part of :attr:`Readout.identity` (so the probe cache
  keys by it). ``lens.path`` loads a lens in the library's format: a folder, or ``hub:<model
  id>`` for the library's published lenses (the ``AlignmentResearch/tuned-lens`` space; one
  line when offline).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibrate import values
from calibrate.engine.lens import LogitLens
from calibrate.errors import ConfigError
from calibrate.readouts import lens_cache, lens_text
from calibrate.readouts.readout_kind import ReadoutKind, ReadoutSource, register_readout
from calibrate.readouts.translators import (
    TranslatedLens,
    file_digest,
    load_lens,
    save_lens,
    unembed_hash,
)

LOG = logging.getLogger("calibrate")
HUB_PREFIX = "hub:"
HUB_REPO = "AlignmentResearch/tuned-lens"  # the library's published lenses (a hub space)
TRAIN_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def check_text_path(key: str, value: Any) -> str | None:
    """``None`` or the path of a regular file (checked when the settings are built)."""
    path = values.optional_text(key, value)
    if path is not None and not Path(path).expanduser().is_file():
        raise ConfigError(f"{key}={path!r} is not a file; accepted: a UTF-8 text file")
    return path


def check_lens_path(key: str, value: Any) -> str | None:
    """``None``, ``hub:<model id>`` or a folder holding ``config.json`` and ``params.pt``."""
    path = values.optional_text(key, value)
    if path is None or path.startswith(HUB_PREFIX):
        if path == HUB_PREFIX:
            raise ConfigError(f"{key}={path!r} names no model; accepted: hub:<model id>")
        return path
    folder = Path(path).expanduser()
    if not ((folder / "config.json").is_file() and (folder / "params.pt").is_file()):
        raise ConfigError(f"{key}={path!r} is not a folder with config.json and params.pt; "
                          "accepted: a tuned-lens folder, or hub:<model id>")
    return path


def check_held_out(settings: Any) -> None:
    """The settings every lens fit on unlabelled text shares: the held-out share and its KL
    positions, the sequence length of a text file, the seed."""
    values.number("lens.holdout_fraction", settings.holdout_fraction, lambda v: 0 <= v < 1,
                  "a number in [0, 1)")
    values.integer("lens.kl_tokens", settings.kl_tokens, 0)
    values.integer("lens.max_length", settings.max_length, 2)
    values.optional_integer("lens.seed", settings.seed, 0)

def cached_fit(kind: str, source: ReadoutSource, text_digest: str, fitting: dict[str, Any]
               ) -> tuple[str, str, TranslatedLens | None]:
    """The cache key of a fit, the lens identity and, when fit before, the cached lens."""
    adapter = source.loaded.adapter
    key = lens_cache.fit_key(kind, source.loaded, text_digest, fitting)
    identity = f"{kind}:{key[:24]}"
    cached = lens_cache.load(kind, key, source.cache_dir)
    if cached is None:
        return key, identity, None
    folder, record = cached
    hidden = int(adapter.unembed_weight.shape[1])
    weight, bias, _ = load_lens(folder, adapter.num_blocks, hidden, "cached lens")
    LOG.info("%s lens: cached fit %s", kind, folder)
    return key, identity, TranslatedLens(adapter, weight, bias, identity,
                                         {**record["summary"], "cache": str(folder)})


@dataclass
class TunedLensSettings:
    """``lens=tuned``: how the tuned lens is trained (or which one is loaded)."""

    name: str = "tuned"
    path: str | None = None  # a saved lens (tuned-lens format) or hub:<model id>: no training
    text_path: str | None = None  # train on this text file instead of the calibration prompts
    steps: int = 40
    tokens_per_step: int = 128
    max_tokens: int = 16384  # training positions kept (a seeded sample when the text has more)
    optimizer: str = "adam"  # adam | sgd (the library's: Nesterov, lr x (1 - momentum))
    lr: float = 0.003
    momentum: float = 0.9  # sgd: momentum; adam: beta1
    weight_decay: float = 0.001
    clip: float = 1.0  # gradient norm clipped to this (the library's 1.0)
    train_dtype: str = "bfloat16"  # unembedding matmuls while training: bfloat16 | float32
    holdout_fraction: float = 0.1  # sequences held out for the reported KL
    kl_tokens: int = 256  # held-out positions the per-layer KL is measured on
    max_length: int = 512  # text_path: tokens per training sequence
    seed: int | None = None  # null: the job's seed

    def __post_init__(self) -> None:
        values.choice("lens", self.name, ("tuned",))
        self.path = check_lens_path("lens.path", self.path)
        self.text_path = check_text_path("lens.text_path", self.text_path)
        values.integer("lens.steps", self.steps, 1)
        values.integer("lens.tokens_per_step", self.tokens_per_step, 1)
        values.integer("lens.max_tokens", self.max_tokens, 1)
        values.choice("lens.optimizer", self.optimizer, ("adam", "sgd"))
        values.number("lens.lr", self.lr, lambda v: v > 0, "a number > 0")
        values.number("lens.momentum", self.momentum, lambda v: 0 <= v < 1, "a number in [0, 1)")
        values.number("lens.weight_decay", self.weight_decay, lambda v: v >= 0, "a number >= 0")
        values.number("lens.clip", self.clip, lambda v: v > 0, "a number > 0")
        values.choice("lens.train_dtype", self.train_dtype, tuple(TRAIN_DTYPES))
        check_held_out(self)

    def training(self) -> dict[str, Any]:
        """The settings that decide a trained lens (its cache key)."""
        return {k: v for k, v in asdict(self).items() if k not in ("name", "path", "text_path")}


# ---------------------------------------------------------------- training

def _unembed_grad(lens: LogitLens, normed: torch.Tensor, p: torch.Tensor, unembed: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean KL(p ‖ q) per token [n] float32, d mean-KL / d normed [n, H] float32) where q is the
    lens's distribution of normed states; the matmuls in ``unembed``'s dtype."""
    raw = (normed.to(unembed.dtype) @ unembed.T).float()
    if lens.bias is not None:
        raw = raw + lens.bias
    z = lens._cap(raw)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    q = (z - lse).exp_()
    kl_part = lse[:, 0] - (p * z).sum(-1)  # + sum p log p, added by the caller
    g = q.sub_(p)
    if lens.softcap is not None:
        g = g * (1 - (z / lens.softcap) ** 2)
    grad = (g.to(unembed.dtype) @ unembed).float() / normed.shape[0]
    return kl_part, grad


def train_translators(lens: LogitLens, residual: torch.Tensor, settings: TunedLensSettings,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Translators (weight [L, H, H], bias [L, H]) trained on residuals [n, L+1, H] with the
    tuned-lens objective; and the mean (over layers) training KL of each step."""
    n, layers_p1, hidden = residual.shape
    n_layers = layers_p1 - 1
    device = lens.device
    residual = residual.to(device)
    dtype = TRAIN_DTYPES[settings.train_dtype]
    weight_u = lens.weight.detach().to(dtype)
    scale = residual[:, :n_layers].pow(2).mean(dim=(0, 2)).sqrt().clamp(min=1e-6)  # [L]
    w = torch.zeros((n_layers, hidden, hidden), device=device, requires_grad=True)
    b_unit = torch.zeros((n_layers, hidden), device=device, requires_grad=True)
    params = [w, b_unit]
    if settings.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=settings.lr * (1 - settings.momentum),
                              momentum=settings.momentum, nesterov=True,
                              weight_decay=settings.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=settings.lr, betas=(settings.momentum, 0.999),
                               weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / settings.steps))
    gen = torch.Generator().manual_seed(seed)
    curve: list[float] = []
    for _ in range(settings.steps):
        idx = torch.randint(n, (min(settings.tokens_per_step, n),), generator=gen).to(device)
        batch = residual[idx]
        with torch.no_grad():
            target = torch.log_softmax(lens_text.full_logits(lens, lens.normalize(batch[:, -1])), -1)
            p = target.exp()
            neg_entropy = (p * target).sum(-1)
        opt.zero_grad(set_to_none=False)
        # the layers' views by unbind and one backward per step: a backward per layer through
        # w[layer] wrote a zero [L, H, H] gradient each time (the same numbers, bit for bit)
        ws, bs = w.unbind(0), b_unit.unbind(0)
        normed, grads = [], []
        total = 0.0
        for layer in range(n_layers):
            h = batch[:, layer]
            normed.append(lens.norm(h + h @ ws[layer].T + bs[layer] * scale[layer]))
            with torch.no_grad():
                kl_part, grad = _unembed_grad(lens, normed[-1].detach(), p, weight_u)
            grads.append(grad)
            total += float((kl_part + neg_entropy).mean())
        torch.autograd.backward(normed, grads)
        torch.nn.utils.clip_grad_norm_(params, settings.clip)
        opt.step()
        schedule.step()
        curve.append(total / n_layers)
    with torch.no_grad():
        return w.detach().cpu(), (b_unit * scale[:, None]).detach().cpu(), curve


# ---------------------------------------------------------------- the readout kind

def lap(clock: float) -> tuple[float, float]:
    """(seconds since ``clock``, rounded; now)."""
    now = time.perf_counter()
    return round(now - clock, 3), now


def _fetch_from_hub(model_id: str, cache_dir: Any) -> Path:
    """The library's published lens for ``model_id`` (config.json + params.pt), downloaded
    into the hub cache; one line when it cannot be fetched."""
    try:
        from huggingface_hub import hf_hub_download

        files = [hf_hub_download(HUB_REPO, name, subfolder=f"lens/{model_id}", repo_type="space")
                 for name in ("config.json", "params.pt")]
    except Exception as err:  # noqa: BLE001 - offline, unknown id, no access: one line each
        raise ConfigError(f"lens.path=hub:{model_id}: the published lens cannot be fetched from "
                          f"the {HUB_REPO} space ({type(err).__name__}); accepted offline: a "
                          "local folder with config.json and params.pt") from None
    return Path(files[0]).parent


def fit_summary(text: lens_text.TrainingText, fit_tokens: int, loaded: Any,
                kl: dict[str, list[float]] | None, extra: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json's ``readout`` block records about a fit."""
    ident = loaded.identity()
    return {"fit_on": {**text.source, "tokens": text.n_tokens, "fit_tokens": int(fit_tokens),
                       "text_sha256": text.digest},
            "model_fingerprint": ident["fingerprint"], "model_dtype": ident["dtype"],
            "kl_to_final": kl, **extra}


def kl_report(lens: LogitLens, readout: TranslatedLens, held: torch.Tensor, name: str
              ) -> dict[str, list[float]] | None:
    """Per-layer KL to the final layer on held-out residuals: the logit lens's and this lens's."""
    if held.shape[0] == 0:
        return None
    kl = lens_text.layer_kls(lens, held, {"logit": None, name: readout.prepare})
    return {"layer": list(range(held.shape[1] - 1)), "tokens": int(held.shape[0]),
            **{key: [float(v) for v in values] for key, values in kl.items()}}


def held_out_residuals(loaded: Any, text: lens_text.TrainingText, held: np.ndarray,
                       kl_tokens: int, seed: int) -> torch.Tensor:
    """Residuals of ``kl_tokens`` sampled positions of the held-out sequences."""
    sequences = [text.sequences[i] for i in held]
    if not sequences or kl_tokens == 0:
        return torch.zeros((0, loaded.adapter.num_blocks + 1,
                            int(loaded.adapter.unembed_weight.shape[1])))
    keep = lens_text.sample_positions([len(s) for s in sequences], kl_tokens, seed + 1)
    return lens_text.collect(loaded, sequences, keep)


@register_readout
class Tuned(ReadoutKind):
    """Every layer below the last through its trained affine translator, then the logit lens."""

    name = "tuned"
    Settings = TunedLensSettings

    def fits_on_prompts(self, settings: TunedLensSettings) -> bool:
        return settings.path is None and settings.text_path is None

    def build(self, settings: TunedLensSettings, source: ReadoutSource) -> TranslatedLens:
        adapter = source.loaded.adapter
        if settings.path is not None:
            return self._load(settings, source)
        seed = source.seed if settings.seed is None else settings.seed
        text = lens_text.training_text(settings, source)
        key, identity, cached = cached_fit(self.name, source, text.digest,
                                           {**settings.training(), "seed": seed})
        if cached is not None:
            return cached
        clock = time.perf_counter()
        seconds = {}
        fit_idx, held_idx = lens_text.split_sequences(len(text.sequences),
                                                      settings.holdout_fraction, seed)
        fit_seqs = [text.sequences[i] for i in fit_idx]
        keep = lens_text.sample_positions([len(s) for s in fit_seqs], settings.max_tokens, seed)
        residual = lens_text.collect(source.loaded, fit_seqs, keep)
        seconds["residuals"], clock = lap(clock)
        LOG.info("tuned lens: training on %d positions of %d sequences, %d steps of %d tokens",
                 residual.shape[0], len(fit_seqs), settings.steps, settings.tokens_per_step)
        plain = LogitLens(adapter)
        weight, bias, curve = train_translators(plain, residual, settings, seed)
        del residual
        seconds["training"], clock = lap(clock)
        readout = TranslatedLens(adapter, weight, bias, identity)
        held = held_out_residuals(source.loaded, text, held_idx, settings.kl_tokens, seed)
        kl = kl_report(plain, readout, held, self.name)
        seconds["kl_report"], clock = lap(clock)
        summary = fit_summary(text, sum(len(k) for k in keep), source.loaded, kl, {
            "held_out_sequences": len(held_idx), "settings": {**settings.training(),
                                                                    "seed": seed},
            "train_kl_first_step": curve[0], "train_kl_last_step": curve[-1],
            "fit_seconds": seconds})
        folder = lens_cache.store(self.name, key, source.cache_dir, {"summary": summary},
                                  lambda tmp: save_lens(tmp, weight, bias,
                                                        base_model=source.loaded.source,
                                                        unembedding=adapter.unembed_weight,
                                                        revision=source.loaded.revision))
        readout._summary = {**summary, "cache": None if folder is None else str(folder)}
        return readout

    def _load(self, settings: TunedLensSettings, source: ReadoutSource) -> TranslatedLens:
        adapter = source.loaded.adapter
        path = settings.path
        folder = (_fetch_from_hub(path[len(HUB_PREFIX):], source.cache_dir)
                  if path.startswith(HUB_PREFIX) else Path(path).expanduser())
        hidden = int(adapter.unembed_weight.shape[1])
        weight, bias, config = load_lens(folder, adapter.num_blocks, hidden)
        ours = unembed_hash(adapter.unembed_weight)
        if config.get("unembed_hash") and config["unembed_hash"] != ours:
            LOG.warning("lens.path=%s: its unembed_hash differs from this model's; it may have "
                        "been trained for another model", path)
        digest = file_digest(folder)
        return TranslatedLens(adapter, weight, bias, f"{self.name}:file:{digest[:24]}", {
            "loaded_from": str(path), "params_sha256": digest,
            "base_model_name_or_path": config.get("base_model_name_or_path"),
            "unembed_hash_matches": config.get("unembed_hash") in (None, ours),
            "model_fingerprint": source.loaded.identity()["fingerprint"]})
