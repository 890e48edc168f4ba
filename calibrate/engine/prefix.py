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

Whatever runs *after* a batch of suffixes (a steered last token, cloze continuations) starts at
the batch's widest suffix, so a shorter row has a gap of masked cache slots before it. Full
attention never sees a gap (masked keys, explicit position ids); a sliding window counts cache
slots, so it would reach back further than in a from-scratch run once a sequence is longer than
the window. :func:`grouped_batches` therefore runs suffixes of one length together wherever a
gapped batch could reach a sliding window (:func:`gaps_reach_window`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from calibrate.engine.hooks import capture_layers
from calibrate.engine.readout import Readout
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


@dataclass
class SharedPrefix:
    """One group's prefix tokens and their key/value cache (batch 1, positions 0..P-1)."""

    tokens: tuple[int, ...]
    cache: Any

    @property
    def length(self) -> int:
        """P, the number of prefix tokens."""
        return len(self.tokens)

    @classmethod
    def run(cls, loaded: LoadedModel, tokens: Sequence[int]) -> SharedPrefix:
        """Run the prefix once and keep its cache."""
        device, backbone = loaded.device, loaded.adapter.backbone
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        with torch.no_grad():
            out = backbone(input_ids=ids, attention_mask=torch.ones_like(ids),
                           position_ids=torch.arange(ids.shape[1], device=device)[None],
                           use_cache=True)
        return cls(tuple(tokens), getattr(out, "cache", None) or out.past_key_values)

    def expanded(self, rows: int) -> Any:
        """A copy of the cache repeated for ``rows`` rows (the shared one is never changed)."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return cache


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


def run_suffixes(loaded: LoadedModel, prefix: SharedPrefix, suffixes: Sequence[Sequence[int]],
                 read_last: bool = False):
    """Run right-padded ``suffixes`` (a row may be empty) after the prefix on an expanded copy
    of its cache, no gradient: (cache of prefix + suffixes, attention mask [B, P+S], and with
    ``read_last`` every layer's residual at each row's last real token [B, L+1, H], else None)."""
    from contextlib import nullcontext

    from calibrate.engine.upper import cache_argument

    device, backbone = loaded.device, loaded.adapter.backbone
    ids, mask, positions, last = right_pad_suffixes(suffixes, loaded.tokenizer.pad_token_id,
                                                    prefix.length)
    cache = prefix.expanded(len(suffixes))
    if not ids.shape[1]:  # every row empty: the prefix's cache is all there is
        return cache, mask, None
    capture = capture_rows(loaded.adapter, last) if read_last else nullcontext()
    with torch.no_grad(), capture as store:
        backbone(input_ids=ids.to(device), attention_mask=mask.to(device),
                 position_ids=positions.to(device), use_cache=True,
                 **{cache_argument(backbone): cache})
    return cache, mask, torch.stack(store, dim=1) if read_last else None


def suffix_batch(loaded: LoadedModel, lens: Readout, prefix: SharedPrefix,
                 suffixes: Sequence[Sequence[int]], option_ids: torch.Tensor, mass_mode: str):
    """One batch of suffixes after a cached prefix: (option logits, mass, stacked residuals,
    suffix attention mask [B, S])."""
    from calibrate.engine.probe import _lens_batch, check_finite

    with torch.inference_mode():
        _, mask, stacked = run_suffixes(loaded, prefix, suffixes, read_last=True)
        stacked = stacked.to(lens.device)  # [B, L+1, H]
        check_finite(stacked)
        logits, mass = _lens_batch(lens, stacked, option_ids, mass_mode)
    return logits, mass, stacked, mask[:, prefix.length:]


def sliding_window(loaded: LoadedModel) -> int | None:
    """The model's sliding attention window in tokens, None where every layer attends fully."""
    config = getattr(loaded.model, "config", None)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types and "sliding_attention" not in layer_types):
        return None
    return int(window)


def gaps_reach_window(loaded: LoadedModel, prefix_length: int, widest: int) -> bool:
    """Whether a batch whose rows run up to ``prefix_length + widest`` cache slots could see a
    padding gap differently from a from-scratch run (a sliding window shorter than that)."""
    window = sliding_window(loaded)
    return window is not None and prefix_length + widest > window


def grouped_batches(loaded: LoadedModel, token_ids: Sequence[Sequence[int]],
                    groups: Sequence[str] | None, settings: Any,
                    run: Callable[[np.ndarray, Any, SharedPrefix | None], Any],
                    extra: Sequence[int] | None = None, gapped: bool = False,
                    on_prefix: Callable[[SharedPrefix], None] | None = None,
                    ) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield ``(indices, run(indices, settings, prefix))`` over every prompt.

    With ``settings.prefix_reuse`` and ``groups``, each group's shared prefix runs once
    (``on_prefix`` is told) and its members run as suffixes after it (``prefix`` given); prompts
    of groups that share nothing, or all prompts without reuse, run whole (``prefix`` None).
    Batches are planned by length (plus ``extra[i]``, e.g. a continuation's width) with the
    probe's budget and out-of-memory halving. ``gapped``: whatever ``run`` appends after the
    suffixes starts at the widest one, so suffixes of one length run together where the gap
    could reach a sliding window.
    """
    from calibrate.engine.probe import run_batches

    n = len(token_ids)
    extra_arr = np.zeros(n, dtype=np.int64) if extra is None else np.asarray(extra, dtype=np.int64)
    whole = np.arange(n)
    if settings.prefix_reuse and groups is not None:
        rest: list[int] = []
        for tokens, members in plan_prefixes(token_ids, groups):
            if not tokens:
                rest.extend(members.tolist())
                continue
            prefix = SharedPrefix.run(loaded, tokens)
            if on_prefix is not None:
                on_prefix(prefix)
            own = np.array([len(token_ids[i]) - len(tokens) for i in members])
            lengths = own + extra_arr[members]
            buckets = [np.arange(len(members))]
            if gapped and gaps_reach_window(loaded, len(tokens), int(lengths.max())):
                buckets = [np.flatnonzero(own == value) for value in np.unique(own)[::-1]]
            for bucket in buckets:
                chosen = members[bucket]

                def call(local: np.ndarray, current: Any, chosen=chosen, prefix=prefix):
                    return run(chosen[local], current, prefix)

                for local, out in run_batches(lengths[bucket], settings, call):
                    yield chosen[local], out
        whole = np.array(rest, dtype=np.int64)
    if len(whole):
        lengths = np.array([len(token_ids[i]) for i in whole]) + extra_arr[whole]

        def call_whole(local: np.ndarray, current: Any):
            return run(whole[local], current, None)

        for local, out in run_batches(lengths, settings, call_whole):
            yield whole[local], out
