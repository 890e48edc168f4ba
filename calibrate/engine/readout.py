"""Edits of the last layer's residual need no forward pass: only the lens read changes.

Adding η·v to the residual after the last block, at the last prompt position, changes nothing
any block computes; the steered option logits are the lens (final norm, option rows of the
unembedding, bias, soft-capping) of the edited residual. Many directions × many η cost a few
small matrix products instead of forward passes.
"""

from __future__ import annotations

import numpy as np
import torch

from calibrate.engine.lens import Lens
from calibrate.model.load import LoadedModel


def last_layer_logits(loaded: LoadedModel, residual: np.ndarray, option_ids: np.ndarray,
                      vectors: np.ndarray, etas: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Option logits [D, E, N, K] of the last layer with ``eta * scale * vectors[d]`` added to
    ``residual`` [N, H] (the last layer's residual at the last position)."""
    lens = Lens(loaded.adapter)
    base = torch.as_tensor(np.asarray(residual), dtype=torch.float32, device=lens.device)
    ids = torch.as_tensor(np.asarray(option_ids), dtype=torch.long)
    vec = torch.as_tensor(np.asarray(vectors), dtype=torch.float32, device=lens.device)
    out = np.empty((len(vectors), len(etas), *option_ids.shape), dtype=np.float32)
    with torch.inference_mode():
        for e, eta in enumerate(np.asarray(etas, dtype=np.float64)):
            edited = base[None] + float(eta * scale) * vec[:, None, :]  # [D, N, H]
            for d in range(len(vectors)):
                normed = lens.normalize(edited[d])[:, None, :]
                out[d, e] = lens.option_logits(normed, ids)[:, 0].cpu().numpy()
    return out


def last_layer_truncated_logits(loaded: LoadedModel, residual: np.ndarray, option_ids: np.ndarray,
                                bases: list[np.ndarray],
                                means: np.ndarray | None = None) -> np.ndarray:
    """Option logits [S, N, K] of the last layer with span(bases[s]) removed from ``residual``
    [N, H] (or replaced by that of ``means`` [H]: mean ablation)."""
    from calibrate.core.subspace import truncate

    lens = Lens(loaded.adapter)
    base = torch.as_tensor(np.asarray(residual), dtype=torch.float32, device=lens.device)
    ids = torch.as_tensor(np.asarray(option_ids), dtype=torch.long)
    mean = None if means is None else torch.as_tensor(means, device=lens.device)
    out = np.empty((len(bases), *option_ids.shape), dtype=np.float32)
    with torch.inference_mode():
        for s, basis in enumerate(bases):
            edited = truncate(base, torch.as_tensor(basis, device=lens.device), mean)
            out[s] = lens.option_logits(lens.normalize(edited)[:, None, :], ids)[:, 0].cpu().numpy()
    return out


def last_layer_steered(loaded: LoadedModel, option_logits: np.ndarray, residual: np.ndarray,
                       option_ids: np.ndarray, intervention) -> np.ndarray:
    """Option logits [V, N, L+1, K] of every variant of an edit of the last layer's residual at
    the last position, from the unsteered result: ``option_logits`` [N, L+1, K] (unchanged below
    the last layer) and the last layer's residual [N, H]; ``intervention`` is any
    :class:`calibrate.engine.steer.Intervention` whose only layer is the last."""
    lens = Lens(loaded.adapter)
    last = option_logits.shape[1] - 1
    if tuple(intervention.layers) != (last,):
        raise ValueError(f"the edit is at layers {list(intervention.layers)}, not only at the last "
                         f"layer {last}")
    n = len(residual)
    base = torch.as_tensor(np.asarray(residual), dtype=torch.float32, device=lens.device)[:, None]
    ids = torch.as_tensor(np.asarray(option_ids), dtype=torch.long)
    out = np.repeat(np.asarray(option_logits, dtype=np.float32)[None], intervention.n_variants, 0)
    with torch.inference_mode():
        for v in range(intervention.n_variants):
            edited = intervention.apply(last, base, torch.full((n,), v, dtype=torch.long))[:, 0]
            out[v, :, -1] = lens.option_logits(lens.normalize(edited)[:, None, :], ids)[:, 0].cpu().numpy()
    return out
