"""Run only the blocks above an edit, on the prompt prefix's key/value cache.

An edit of the residual at layer ``l`` (the input of block index ``l``) leaves every layer
below ``l`` unchanged at every position, and an edit of the last position leaves every other
position unchanged at every layer. So the prompt runs once, unedited, through every block: its
last position's residuals give the unchanged layers, and its key/value cache without the last
position is what the upper blocks attend to. Each edited version of the last position then runs
through blocks ``l..L-1`` only.

The backbone is run as transformers runs it (masks, rotary positions, sliding windows, cache
bookkeeping) with its list of blocks swapped for the upper slice; a pre-hook on the first upper
block replaces whatever the embeddings produced by the residual to inject. Blocks keep their
own ``layer_idx``, so each reads its own entries of the full cache.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from calibrate.engine.context import ContextState, whole_contexts
from calibrate.engine.hooks import capture_last_position
from calibrate.model.adapters import Adapter, block_hidden
from calibrate.model.load import LoadedModel


def cache_argument(backbone: nn.Module) -> str:
    """Name of the key/value cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class PrefixState:
    """One batch of left-padded prompts run once, unedited."""

    cache: Any  # key/value cache of every block for all positions but the last
    mask: torch.Tensor  # [B, T] attention mask of the whole prompt
    last_ids: torch.Tensor  # [B] the last token
    last_positions: torch.Tensor  # [B] its position id
    residuals: torch.Tensor  # [B, L+1, H] the last position's residual at every layer


def prefix_states(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> PrefixState:
    """Run left-padded prompts once (no gradient): every layer's last-position residual and the
    cache of the other positions. Prompts need at least two tokens (the width, not each row)."""
    if ids.shape[1] < 2:
        raise ValueError("prefix_states needs prompts of at least two tokens")
    return last_states(loaded, whole_contexts(loaded, ids, mask))


def last_states(loaded: LoadedModel, context: ContextState) -> PrefixState:
    """Run each context's last token after its cache (on a shallow copy, no gradient) and keep
    its residual at every layer."""
    if context.cache is None:
        raise ValueError("last_states needs a cached context (prompts of at least two tokens)")
    backbone = loaded.adapter.backbone
    ones = torch.ones((len(context.last_ids), 1), dtype=context.mask.dtype)
    mask = context.mask_with(ones)
    with torch.no_grad(), capture_last_position(loaded.adapter) as store:
        backbone(input_ids=context.last_ids[:, None], attention_mask=mask,
                 position_ids=context.last_positions[:, None], use_cache=True,
                 **{cache_argument(backbone): rows_cache(context.cache, None, 0)})
    return PrefixState(context.cache, mask, context.last_ids, context.last_positions,
                       torch.stack(store, dim=1))


def _owner(backbone: nn.Module, blocks: nn.ModuleList) -> tuple[nn.Module, str]:
    """The module and attribute name that hold ``blocks``."""
    for module in backbone.modules():
        for name, child in module.named_children():
            if child is blocks:
                return module, name
    raise ValueError("the adapter's blocks are not a child of its backbone")


@contextmanager
def only_blocks_from(adapter: Adapter, start: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the context the backbone runs blocks ``start..L-1`` only, with the input of block
    ``start`` replaced by ``hidden`` [R, T', H]; blocks, per-layer types and hooks are restored
    in ``finally``."""
    blocks = adapter.blocks
    owner, name = _owner(adapter.backbone, blocks)

    def inject(_module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    # Gemma-3 and Qwen2 pick block i's mask and rotary base by config.layer_types[i], i counted
    # in the block list: the slice must see the types of its own blocks
    config = getattr(adapter.backbone, "config", None)
    layer_types = getattr(config, "layer_types", None)
    sliced = isinstance(layer_types, list) and len(layer_types) == len(blocks)
    handle = blocks[start].register_forward_pre_hook(inject, with_kwargs=True, prepend=True)
    try:
        setattr(owner, name, nn.ModuleList(list(blocks)[start:]))
        if sliced:
            config.layer_types = layer_types[start:]
        yield
    finally:
        setattr(owner, name, blocks)
        if sliced:
            config.layer_types = layer_types
        handle.remove()


def rows_cache(cache: Any, rows: torch.Tensor | None, start: int) -> Any:
    """A copy of ``cache`` whose blocks from ``start`` on hold the rows ``rows`` (with repeats;
    None: all rows); the tensors of the blocks below are shared (they must not run). A run on
    the copy never changes ``cache`` (layers replace their tensors, they do not write into them).
    """
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in out.layers[start:] if rows is not None else ():
        layer.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
        layer.values = layer.values.index_select(0, rows.to(layer.values.device))
    return out


@contextmanager
def capture_upper(adapter: Adapter, start: int, positions: int | slice = -1) -> Iterator[list[torch.Tensor]]:
    """Collect ``hidden[:, positions]`` after each block from ``start`` on (kept in the graph)."""
    store: list[torch.Tensor] = []

    def post(_module, _args, output):
        store.append(block_hidden(output)[:, positions])

    handles = []
    try:
        handles += [block.register_forward_hook(post) for block in list(adapter.blocks)[start:]]
        yield store
    finally:
        for handle in handles:
            handle.remove()


def upper_forward(loaded: LoadedModel, state: PrefixState, start: int, hidden: torch.Tensor,
                  rows: torch.Tensor) -> torch.Tensor:
    """Residuals [R, L+1-start, H] at layers ``start..L`` of the last position when its residual
    at layer ``start`` is ``hidden`` [R, H] and row r is prompt ``rows[r]`` of ``state``.

    Differentiable in ``hidden`` outside inference mode (the prefix cache is a constant). Edit
    hooks registered on blocks from ``start`` on apply as usual.
    """
    adapter = loaded.adapter
    if not 0 <= start <= adapter.num_blocks:
        raise ValueError(f"start layer {start} outside 0..{adapter.num_blocks}")
    if start == adapter.num_blocks:
        return hidden[:, None]
    device, backbone = loaded.device, adapter.backbone
    rows = rows.to(device)
    cache = rows_cache(state.cache, rows, start)
    injected = hidden[:, None].to(device)
    with only_blocks_from(adapter, start, injected), capture_upper(adapter, start) as store:
        backbone(input_ids=state.last_ids[rows][:, None], attention_mask=state.mask[rows],
                 position_ids=state.last_positions[rows][:, None], use_cache=True,
                 **{cache_argument(backbone): cache})
    return torch.stack([injected[:, 0], *store], dim=1)
