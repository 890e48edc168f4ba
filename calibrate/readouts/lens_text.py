"""The unlabelled text a fitted lens is trained on, its residuals at every position, and the
per-layer KL of a lens to the model's own final-layer distribution.

Training text is, by default, the job's calibration split's prompts (never an evaluated row;
:attr:`~calibrate.readouts.readout_kind.ReadoutSource.calibration_prompts`), or a UTF-8 text file
(``lens.text_path``: documents separated by blank lines, each cut into windows of
``lens.max_length`` tokens). Its sequences are split, seeded, into the part the lens is fit on
and a held-out part on which the per-layer KL is reported. No label is ever read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibrate.engine.hooks import capture_layers
from calibrate.engine.lens import LogitLens
from calibrate.engine.probe import ProbeSettings, left_pad, plan_batches, position_ids
from calibrate.errors import ConfigError
from calibrate.model.load import LoadedModel

# Real tokens per forward pass when residuals of every position are collected.
COLLECT_TOKENS = 2048
# Tokens per chunk when full-vocabulary logits are formed (bounds [chunk, vocab] float32).
KL_CHUNK = 64
# Rows x vocabulary of the float32 logits one KL matmul forms (several layers of a chunk).
KL_ROWS = 1 << 24


@dataclass
class TrainingText:
    """Token sequences a lens is fit on, and what they are (for metrics.json and cache keys)."""

    sequences: list[list[int]]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    @property
    def digest(self) -> str:
        """sha256 of the token ids (what the lens sees, whatever text produced them)."""
        h = hashlib.sha256()
        for seq in self.sequences:
            h.update(np.asarray(seq, dtype=np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()


def from_prompts(loaded: LoadedModel, prompts: Sequence[str], split: dict[str, Any] | None
                 ) -> TrainingText:
    """The prompts as the probe tokenizes them (the tokenizer's own BOS default)."""
    sequences = [list(s) for s in loaded.tokenizer(list(prompts))["input_ids"]]
    return TrainingText(sequences, {"text": "calibration split prompts",
                                    **(split or {}), "n_sequences": len(sequences)})


def from_file(loaded: LoadedModel, path: str, max_length: int, key: str = "lens.text_path"
              ) -> TrainingText:
    """A UTF-8 text file: documents separated by blank lines, each tokenized and cut into
    windows of ``max_length`` tokens."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}={path!r}: cannot read it as UTF-8 text "
                          f"({type(err).__name__}); accepted: a UTF-8 text file") from None
    documents = [d.strip() for d in text.replace("\r\n", "\n").split("\n\n") if d.strip()]
    if not documents:
        raise ConfigError(f"{key}={path!r} holds no text; accepted: a UTF-8 text file with text")
    sequences = []
    for ids in loaded.tokenizer(documents)["input_ids"]:
        sequences += [list(ids[i:i + max_length]) for i in range(0, len(ids), max_length)]
    sequences = [s for s in sequences if len(s) >= 2]
    if not sequences:
        raise ConfigError(f"{key}={path!r}: no document has two tokens; accepted: a text file")
    return TrainingText(sequences, {"text": "file", "path": str(file.resolve()),
                                    "n_documents": len(documents),
                                    "n_sequences": len(sequences)})


def training_text(settings: Any, source: Any) -> TrainingText:
    """``settings.text_path`` if set, else the source's calibration prompts; refused (one line)
    when there is neither."""
    if getattr(settings, "text_path", None):
        return from_file(source.loaded, settings.text_path, settings.max_length)
    if source.calibration_prompts is None:
        raise ConfigError(f"lens={settings.name} trains on the job's calibration split, and this "
                          "job has none; accepted: a study with a split, or lens.text_path=<a "
                          "text file>, or lens.path=<a saved lens>")
    return from_prompts(source.loaded, source.calibration_prompts.prompts, source.split)


def split_sequences(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (fit, held-out) sequence indices; held out: round(fraction * n), at least one
    when ``fraction`` > 0 and n >= 2, never all."""
    order = np.random.default_rng(seed).permutation(n)
    held = 0 if fraction <= 0 or n < 2 else min(max(1, round(fraction * n)), n - 1)
    return np.sort(order[held:]), np.sort(order[:held])


def sample_positions(lengths: Sequence[int], max_tokens: int | None, seed: int
                     ) -> list[np.ndarray]:
    """Per sequence, the positions kept: all of them, or a seeded uniform sample of
    ``max_tokens`` positions over all sequences."""
    lengths = [int(n) for n in lengths]
    total = sum(lengths)
    if max_tokens is None or total <= max_tokens:
        return [np.arange(n) for n in lengths]
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=max_tokens, replace=False))
    starts = np.cumsum([0, *lengths])
    return [chosen[(chosen >= a) & (chosen < b)] - a for a, b in zip(starts[:-1], starts[1:])]


def residual_batches(loaded: LoadedModel, sequences: Sequence[Sequence[int]],
                     keep: Sequence[np.ndarray] | None = None,
                     budget: int = COLLECT_TOKENS) -> Iterator[torch.Tensor]:
    """Residuals [n, L+1, H] (float32, the model's device) of every layer at the kept positions
    of each sequence (default: all), batch by batch; one forward pass each, left-padded with
    explicit positions as the probe runs, each sequence cut after its last kept position. The
    batches are planned on the whole sequences (rows come back in the same order however many
    positions are kept)."""
    keep = [np.arange(len(s)) for s in sequences] if keep is None else keep
    wanted = [i for i, k in enumerate(keep) if len(k)]
    lengths = np.array([len(sequences[i]) for i in wanted])
    settings = ProbeSettings(max_tokens=budget, progress=False)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    for batch in plan_batches(lengths, settings):
        idx = [wanted[int(b)] for b in batch]
        # causal: a sequence is run up to its last kept position only
        cut = [sequences[i][:int(keep[i].max()) + 1] for i in idx]
        ids, mask = left_pad(cut, pad)
        width = ids.shape[1]
        rows = torch.cat([torch.full((len(keep[i]),), r) for r, i in enumerate(idx)])
        cols = torch.cat([torch.as_tensor(width - len(c) + keep[i]) for c, i in zip(cut, idx)])
        rows, cols = rows.to(loaded.device), cols.to(loaded.device)
        with torch.inference_mode(), capture_layers(
                loaded.adapter, lambda hidden, r=rows, c=cols: hidden[r, c]) as store:
            loaded.adapter.backbone(input_ids=ids.to(loaded.device),
                                    attention_mask=mask.to(loaded.device),
                                    position_ids=position_ids(mask).to(loaded.device),
                                    use_cache=False)
        yield torch.stack([t.float() for t in store], dim=1)


def collect(loaded: LoadedModel, sequences: Sequence[Sequence[int]],
            keep: Sequence[np.ndarray] | None = None) -> torch.Tensor:
    """All of :func:`residual_batches` in one tensor [n, L+1, H] (CPU, float32)."""
    parts = [b.cpu() for b in residual_batches(loaded, sequences, keep)]
    if not parts:
        raise ConfigError("the lens's training text has no token to fit on")
    return torch.cat(parts)


def full_logits(lens: LogitLens, normed: torch.Tensor) -> torch.Tensor:
    """Every token's logit of normed states [n, H] (float32, bias and soft-capping applied)."""
    weight = lens.weight if lens.weight.dtype == torch.float32 else lens.weight.float()
    logits = normed.to(device=lens.device, dtype=torch.float32) @ weight.T
    if lens.bias is not None:
        logits = logits + lens.bias
    return lens._cap(logits)


def layer_kl(lens: LogitLens, residual: torch.Tensor,
             prepare: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None
             ) -> np.ndarray:
    """Mean KL(final layer ‖ lens at layer ℓ) over the tokens of ``residual`` [n, L+1, H], for
    every layer ℓ below the last: [L] float64 nats. The final layer is the logit lens of the
    last residual (the model's own next-token distribution); ``prepare(h [n, L', H], layers)``
    gives the lens's normed states (default: the logit lens's final norm). The logits are
    float32 (as every read), the log-softmax and the sums float64 (a KL near 0 is a small
    difference of two entropies). Several layers share one unembedding matmul (up to
    ``KL_ROWS`` rows of logits), which streams the unembedding fewer times."""
    return layer_kls(lens, residual, {"kl": prepare})["kl"]


def layer_kls(lens: LogitLens, residual: torch.Tensor,
              prepares: dict[str, Callable[[torch.Tensor, list[int]], torch.Tensor] | None]
              ) -> dict[str, np.ndarray]:
    """:func:`layer_kl` of several lenses (name: prepare, None for the logit lens) on the same
    residuals, the final layer's distribution computed once per chunk."""
    n_layers = residual.shape[1] - 1
    vocab = int(lens.weight.shape[0])
    group = max(1, KL_ROWS // (KL_CHUNK * vocab))  # layers per matmul
    totals = {name: np.zeros(n_layers) for name in prepares}
    with torch.no_grad():
        for start in range(0, residual.shape[0], KL_CHUNK):
            chunk = residual[start:start + KL_CHUNK].to(lens.device)
            m = chunk.shape[0]
            target = torch.log_softmax(
                full_logits(lens, lens.normalize(chunk[:, -1])).double(), -1)
            p = target.exp()
            neg_entropy = (p * target).sum(-1)
            below = chunk[:, :-1]
            for name, prepare in prepares.items():
                normed = (lens.normalize(below) if prepare is None
                          else prepare(below, list(range(n_layers))))  # [m, L, H]
                for first in range(0, n_layers, group):
                    part = normed[:, first:first + group].transpose(0, 1)  # [g, m, H]
                    logits = full_logits(lens, part.reshape(-1, part.shape[-1])).view(
                        part.shape[0], m, -1)
                    for i in range(part.shape[0]):
                        logq = torch.log_softmax(logits[i].double(), -1)
                        totals[name][first + i] += float((neg_entropy - (p * logq).sum(-1)).sum())
    return {name: total / max(residual.shape[0], 1) for name, total in totals.items()}
