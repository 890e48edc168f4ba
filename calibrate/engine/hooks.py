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
def capture_last_position(adapter: Adapter) -> Iterator[list[torch.Tensor]]:
    """Collect the residual at the last position of every layer, in layer order.

    The yielded list is filled by one forward pass with L + 1 tensors of shape [batch, hidden]
    (detached, in the model's dtype). Prompts must be left-padded so the last position is real.
    """
    store: list[torch.Tensor] = []

    # clone: a view would keep every layer's whole [batch, seq, hidden] output alive
    def pre(_module, args, kwargs):
        store.append(_pre_hidden(args, kwargs)[:, -1].detach().clone())

    def post(_module, _args, output):
        store.append(block_hidden(output)[:, -1].detach().clone())

    handles = [adapter.blocks[0].register_forward_pre_hook(pre, with_kwargs=True)]
    try:
        handles += [block.register_forward_hook(post) for block in adapter.blocks]
        yield store
    finally:
        for handle in handles:
            handle.remove()


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
