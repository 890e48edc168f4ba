"""Shared-prefix reuse: the k-shot exemplars run once per group, only each question runs again.

Every prompt of a group (an MMLU subject; every prompt elsewhere) starts with the same
exemplars. The prefix is the longest common prefix of the group's *whole-prompt tokenizations*
(at most each prompt's length minus one), so prefix tokens + suffix tokens is each prompt's own
tokenization by construction: a boundary merge ("\\n\\n" + "Find") only shortens the shared part.

The prefix runs once (positions 0..P-1) and its key/value cache is expanded across each batch of
suffixes. Suffixes are RIGHT-padded: every real token sits at cache index == position id
(P, P+1, ...), as in a from-scratch run, so sliding-window layers (Gemma-3) see the same keys;
each row's last real token is gathered per row (not ``[:, -1]``). The lens reads it exactly as
:func:`calibrate.engine.probe.run_probe` does. Equal to from-scratch prompts within float
tolerance at every layer (tests/test_prefix.py).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from calibrate.engine.hooks import capture_layers
from calibrate.engine.lens import Lens
from calibrate.model.adapters import Adapter
from calibrate.model.load import LoadedModel


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every sequence."""
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for seq in sequences[1:]:
        n = 0
        while n < length and seq[n] == first[n]:
            n += 1
        length = n
    return length


def plan_prefixes(token_ids: Sequence[Sequence[int]],
                  groups: Sequence[str]) -> list[tuple[list[int], np.ndarray]]:
    """(prefix tokens, member indices) per group, in first-seen order. The prefix leaves every
    member at least one token of its own (the position read); it is empty where the group's
    prompts share nothing (those run in full)."""
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    plan = []
    for idx in members.values():
        seqs = [token_ids[i] for i in idx]
        length = min(common_prefix_length(seqs), min(len(s) for s in seqs) - 1)
        plan.append((list(seqs[0][:max(length, 0)]), np.array(idx)))
    return plan


def capture_rows(adapter: Adapter, last: torch.Tensor):
    """Collect every layer's residual at position ``last[r]`` of each row r ([B] indices)."""
    def select(hidden: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last.to(hidden.device)]
    return capture_layers(adapter, select)


def prefix_cache(loaded: LoadedModel, prefix: Sequence[int]):
    """The key/value cache of one prefix (batch 1, positions 0..P-1)."""
    device, backbone = loaded.device, loaded.adapter.backbone
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
    with torch.inference_mode():
        out = backbone(input_ids=ids, attention_mask=torch.ones_like(ids),
                       position_ids=torch.arange(ids.shape[1], device=device)[None],
                       use_cache=True)
    return getattr(out, "cache", None) or out.past_key_values


def right_pad_suffixes(suffixes: Sequence[Sequence[int]], pad_id: int,
                       prefix_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                    torch.Tensor]:
    """(ids [B, S], attention mask [B, P+S], position ids [B, S], last real index [B])."""
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(suffixes), prefix_length + width), dtype=torch.long)
    mask[:, :prefix_length] = 1
    for row, seq in enumerate(suffixes):
        ids[row, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, prefix_length:prefix_length + len(seq)] = 1
    positions = (prefix_length + torch.arange(width))[None].expand(len(suffixes), -1)
    last = torch.tensor([len(s) - 1 for s in suffixes], dtype=torch.long)
    return ids, mask, positions, last


def suffix_batch(loaded: LoadedModel, lens: Lens, cache, prefix_length: int,
                 suffixes: Sequence[Sequence[int]], option_ids: torch.Tensor, mass_mode: str):
    """One batch of suffixes after a cached prefix: (option logits, mass, stacked residuals,
    suffix attention mask [B, S])."""
    from calibrate.engine.probe import _lens_batch, check_finite
    from calibrate.engine.upper import cache_argument

    device, backbone = loaded.device, loaded.adapter.backbone
    ids, mask, positions, last = right_pad_suffixes(suffixes, loaded.tokenizer.pad_token_id,
                                                    prefix_length)
    expanded = copy.deepcopy(cache)
    expanded.batch_repeat_interleave(len(suffixes))
    with torch.inference_mode(), capture_rows(loaded.adapter, last) as store:
        backbone(input_ids=ids.to(device), attention_mask=mask.to(device),
                 position_ids=positions.to(device), use_cache=True,
                 **{cache_argument(backbone): expanded})
        stacked = torch.stack([t.to(lens.device) for t in store], dim=1)  # [B, L+1, H]
        check_finite(stacked)
        logits, mass = _lens_batch(lens, stacked, option_ids, mass_mode)
    return logits, mass, stacked, mask[:, prefix_length:]
