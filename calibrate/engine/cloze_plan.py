"""Planning a cloze batch's token requests, before any model runs: padding, grouping and the
map from every continuation token to the state that predicts it.

:mod:`calibrate.engine.cloze` runs the plan. Rows are (example, option) pairs in example order;
the residual *sources* are the B context-last states followed by each continuation group's
[rows x width] states, and a *state* is one distinct prefix (example, continuation tokens so
far), read through the lens once however many options share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from calibrate.engine.probe import ProbeSettings, plan_batches

CONTINUATION_MIN_FILL = 0.5  # least share of real positions in one continuation pass


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int,
              width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to ``width``: (input_ids, attention_mask), both [R, width] int64."""
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask


@dataclass(frozen=True)
class TokenPlan:
    """Which residual predicts each continuation token.

    Residual sources are the B context-last states followed by the continuation passes' states;
    ``row_base[r]`` is where row r's position 0 lies among them. Each distinct prefix (example,
    continuation tokens so far) is one state, read through the lens once.
    """

    state_src: torch.Tensor  # [S] index into the sources
    token_state: torch.Tensor  # [M] state predicting each continuation token
    token_target: torch.Tensor  # [M] the token
    token_row: torch.Tensor  # [M] its (example, option) row


def token_plan(continuations: Sequence[Sequence[int]], row_example: Sequence[int],
               row_base: Sequence[int]) -> TokenPlan:
    """Map every continuation token to the state before it, sharing states across options.

    Token 0 of row r is predicted by its example's last context position (source
    ``row_example[r]``), token p >= 1 by the row's continuation position p - 1
    (source ``row_base[r] + p - 1``).
    """
    states: dict[tuple, int] = {}  # ("context", example) or (state before, token) -> state
    src, tok_state, targets, rows = [], [], [], []
    for r, (cont, b) in enumerate(zip(continuations, row_example)):
        key: tuple = ("context", int(b))
        for p, target in enumerate(cont):
            if key not in states:
                states[key] = len(src)
                src.append(int(b) if p == 0 else int(row_base[r]) + p - 1)
            tok_state.append(states[key])
            targets.append(int(target))
            rows.append(r)
            key = (states[key], int(target))
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return TokenPlan(as_long(src), as_long(tok_state), as_long(targets), as_long(rows))


def continuation_groups(widths: Sequence[int], settings: ProbeSettings) -> list[np.ndarray]:
    """Rows with tokens to run (width > 0), longest first, grouped like :func:`plan_batches`
    (token budget, least fill ``CONTINUATION_MIN_FILL``) so short rows are not padded to long ones.

    The fill is lower than the contexts': a pass over a few tokens per row costs mostly the
    reading of the weights, so fewer passes beat less padding.
    """
    rows = np.array([r for r, w in enumerate(widths) if w > 0], dtype=np.int64)
    if not len(rows):
        return []
    unbounded = replace(settings, batch_size=None, max_batch_size=len(rows),
                        min_fill=min(settings.min_fill, CONTINUATION_MIN_FILL))
    return [rows[g] for g in plan_batches(np.asarray(widths)[rows], unbounded)]


def source_layout(widths: Sequence[int], groups: Sequence[np.ndarray],
            n_examples: int) -> tuple[list[int], list[int]]:
    """Where each row's continuation position 0 lies among the sources (B context states, then
    each group's [rows x width] states), and where each group's states start."""
    row_base, starts, offset = [0] * len(widths), [], n_examples
    for rows in groups:
        width = max(widths[r] for r in rows)
        for j, r in enumerate(rows):
            row_base[r] = offset + j * width
        starts.append(offset)
        offset += len(rows) * width
    return row_base, starts
