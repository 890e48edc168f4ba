"""Forward hooks on the residual stream; every hook is removed in ``finally``.

Layer numbering (the same in every file, table and config): layer 0 is the input of block 0
(the embedding output, after any embedding scaling), layer l is the output of block l
(1-based), so a model with L blocks has L + 1 layers. The last layer is read before the final
norm, which the lens applies itself; nothing is ever normalized twice (``output_hidden_states``
would hand back an already-normalized last entry).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from calibrate.model.adapters import Adapter, block_hidden, replace_block_hidden

# Edits the [batch, seq, hidden] residual after a layer; returns the new residual.
ResidualEdit = Callable[[int, torch.Tensor], torch.Tensor]


def _pre_hidden(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def capture_layers(adapter: Adapter,
                   select: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Collect ``select(hidden)`` of every layer's [batch, seq, hidden] residual, in layer order.

    The yielded list is filled by one forward pass with L + 1 detached copies (in the model's
    dtype): the input of block 0, then each block's output.
    """
    store: list[torch.Tensor] = []

    def keep(hidden: torch.Tensor) -> None:
        store.append(select(hidden).detach().clone())  # a view would pin the whole layer

    def pre(_module, args, kwargs):
        keep(_pre_hidden(args, kwargs))

    def post(_module, _args, output):
        keep(block_hidden(output))

    handles = [adapter.blocks[0].register_forward_pre_hook(pre, with_kwargs=True)]
    try:
        handles += [block.register_forward_hook(post) for block in adapter.blocks]
        yield store
    finally:
        for handle in handles:
            handle.remove()


def capture_last_position(adapter: Adapter):
    """:func:`capture_layers` of the last position: L + 1 tensors [batch, hidden]. Prompts
    must be left-padded so the last position is real."""
    return capture_layers(adapter, lambda hidden: hidden[:, -1])


@contextmanager
def edit_residual(adapter: Adapter, layers: list[int], edit: ResidualEdit) -> Iterator[None]:
    """Apply ``edit(layer, hidden)`` to the residual after each layer in ``layers``.

    Layer 0 edits the input of block 0; layer l >= 1 edits the output of block l. The edit runs
    before any capture hook registered later sees the output, so captured residuals of edited
    layers are the edited ones.
    """
    handles = []

    def make_post(layer: int):
        def post(_module, _args, output):
            return replace_block_hidden(output, edit(layer, block_hidden(output)))
        return post

    def make_pre(layer: int):
        def pre(_module, args, kwargs):
            hidden = edit(layer, _pre_hidden(args, kwargs))
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        return pre

    try:
        for layer in layers:
            if layer == 0:
                handles.append(adapter.blocks[0].register_forward_pre_hook(
                    make_pre(layer), with_kwargs=True, prepend=True))
            else:
                handles.append(adapter.blocks[layer - 1].register_forward_hook(
                    make_post(layer), prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
