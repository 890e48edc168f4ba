"""From option scores to option probabilities (float64), and the full-vocabulary mass on them."""

from __future__ import annotations

import numpy as np
import torch


def option_probabilities(logits: np.ndarray) -> np.ndarray:
    """Float64 softmax over the option axis; -inf slots get probability 0.

    Computed in float64 from float32 logits: a float32 softmax over a few logits returns exactly
    1.0 once their gap exceeds ~17, which late layers reach.
    """
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def option_mass(option_logits: torch.Tensor, logsumexp: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary probability mass on the options: [..., K] and [...] -> [...] float64."""
    return torch.exp(torch.logsumexp(option_logits.double(), dim=-1) - logsumexp)
