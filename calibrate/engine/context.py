"""A batch of contexts held as the key/value cache of every position but the last.

What a steered pass (:mod:`calibrate.engine.upper`) and the steered cloze tails
(:mod:`calibrate.engine.cloze_steer`) build on: the edit lands on the context's last token,
which then runs again after this cache. Contexts come in one of two layouts:

* whole, left-padded, positions counted from each row's first real token
  (:func:`whole_contexts`);
* a shared prefix's cache expanded across the batch, then each row's own suffix right-padded
  (:func:`suffix_contexts`, :mod:`calibrate.engine.prefix`): a shorter row's last token then
  runs after a gap of masked slots, which only a sliding window could notice
  (:func:`calibrate.engine.prefix.grouped_batches` keeps such batches to one suffix length).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from calibrate.engine.prefix import SharedPrefix, run_suffixes
from calibrate.model.load import LoadedModel


@dataclass
class ContextState:
    """Contexts without their last token, run once, and that token."""

    cache: Any | None  # every block's keys and values of the cached positions (None: none)
    mask: torch.Tensor  # [B, C] attention mask over the cached positions
    last_ids: torch.Tensor  # [B] each context's last token
    last_positions: torch.Tensor  # [B] its position id

    def mask_with(self, tail_mask: torch.Tensor) -> torch.Tensor:
        """The attention mask of tokens appended after the cache: [B, C + T]."""
        return torch.cat([self.mask, tail_mask.to(self.mask.device)], dim=1)


def _cache_of(out: Any) -> Any:
    return getattr(out, "cache", None) or out.past_key_values


def whole_contexts(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> ContextState:
    """Left-padded contexts ids/mask [B, T]: positions 0..T-2 run (no gradient)."""
    from calibrate.engine.probe import position_ids

    device, backbone = loaded.device, loaded.adapter.backbone
    ids, mask = ids.to(device), mask.to(device)
    pos = position_ids(mask)
    cache = None
    if ids.shape[1] > 1:
        with torch.no_grad():
            cache = _cache_of(backbone(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                                       position_ids=pos[:, :-1], use_cache=True))
    return ContextState(cache, mask[:, :-1], ids[:, -1], pos[:, -1])


def suffix_contexts(loaded: LoadedModel, prefix: SharedPrefix,
                    suffixes: Sequence[Sequence[int]]) -> ContextState:
    """Contexts ``prefix + suffix`` (each suffix at least one token): the prefix's cache, then
    every suffix but its last token, right-padded (no gradient)."""
    if any(len(s) < 1 for s in suffixes):
        raise ValueError("every suffix needs at least one token after the shared prefix")
    device = loaded.device
    cache, mask, _ = run_suffixes(loaded, prefix, [list(s[:-1]) for s in suffixes])
    last_ids = torch.tensor([s[-1] for s in suffixes], dtype=torch.long, device=device)
    last_positions = torch.tensor([prefix.length + len(s) - 1 for s in suffixes],
                                  dtype=torch.long, device=device)
    return ContextState(cache, mask.to(device), last_ids, last_positions)
