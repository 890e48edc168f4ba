"""Edits of the last layer's residual need no forward pass: only the read of it changes.

Adding η·v to the residual after the last block, at the last prompt position, changes nothing
any block computes; the steered option logits are the readout's read (by default the logit lens:
final norm, option rows of the unembedding, bias, soft-capping) of the edited residual. Many
directions × many η cost a few small matrix products instead of forward passes.
"""

from __future__ import annotations

import numpy as np
import torch

from calibrate.engine.lens import LogitLens
from calibrate.engine.readout import Readout
from calibrate.model.load import LoadedModel


def _read_last(lens: Readout, residual: torch.Tensor, ids: torch.Tensor, last: int) -> np.ndarray:
    """Option logits [N, K] of last-layer residuals [N, H]."""
    return lens.read_layers(residual[:, None, :], [last], ids)[:, 0].cpu().numpy()


def last_layer_logits(loaded: LoadedModel, residual: np.ndarray, option_ids: np.ndarray,
                      vectors: np.ndarray, etas: np.ndarray, scale: float = 1.0,
                      readout: Readout | None = None) -> np.ndarray:
    """Option logits [D, E, N, K] of the last layer with ``eta * scale * vectors[d]`` added to
    ``residual`` [N, H] (the last layer's residual at the last position)."""
    lens, last = readout or LogitLens(loaded.adapter), loaded.adapter.num_blocks
    base = torch.as_tensor(np.asarray(residual), dtype=torch.float32, device=lens.device)
    ids = torch.as_tensor(np.asarray(option_ids), dtype=torch.long)
    vec = torch.as_tensor(np.asarray(vectors), dtype=torch.float32, device=lens.device)
    out = np.empty((len(vectors), len(etas), *option_ids.shape), dtype=np.float32)
    with torch.inference_mode():
        for e, eta in enumerate(np.asarray(etas, dtype=np.float64)):
            edited = base[None] + float(eta * scale) * vec[:, None, :]  # [D, N, H]
            for d in range(len(vectors)):
                out[d, e] = _read_last(lens, edited[d], ids, last)
    return out


def last_layer_truncated_logits(loaded: LoadedModel, residual: np.ndarray, option_ids: np.ndarray,
                                bases: list[np.ndarray], means: np.ndarray | None = None,
                                readout: Readout | None = None) -> np.ndarray:
    """Option logits [S, N, K] of the last layer with span(bases[s]) removed from ``residual``
    [N, H] (or replaced by that of ``means`` [H]: mean ablation)."""
    from calibrate.core.subspace import truncate

    lens, last = readout or LogitLens(loaded.adapter), loaded.adapter.num_blocks
    base = torch.as_tensor(np.asarray(residual), dtype=torch.float32, device=lens.device)
    ids = torch.as_tensor(np.asarray(option_ids), dtype=torch.long)
    mean = None if means is None else torch.as_tensor(means, device=lens.device)
    out = np.empty((len(bases), *option_ids.shape), dtype=np.float32)
    with torch.inference_mode():
        for s, basis in enumerate(bases):
            edited = truncate(base, torch.as_tensor(basis, device=lens.device), mean)
            out[s] = _read_last(lens, edited, ids, last)
    return out


def last_layer_steered(loaded: LoadedModel, option_logits: np.ndarray, residual: np.ndarray,
                       option_ids: np.ndarray, intervention,
                       readout: Readout | None = None) -> np.ndarray:
    """Option logits [V, N, L+1, K] of every variant of an edit of the last layer's residual at
    the last position, from the unsteered result: ``option_logits`` [N, L+1, K] (unchanged below
    the last layer) and the last layer's residual [N, H]; ``intervention`` is any
    :class:`calibrate.engine.steer.Intervention` whose only layer is the last."""
    lens = readout or LogitLens(loaded.adapter)
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
            out[v, :, -1] = _read_last(lens, edited, ids, last)
    return out
