"""Edits of the last layer's residual need no forward pass: only the read of it changes.

Adding η·v to the residual after the last block, at the last prompt position, changes nothing
any block computes; the steered option logits are the readout's read (by default the logit lens:
final norm, option rows of the unembedding, bias, soft-capping) of the edited residual. Many
directions × many η cost a few small matrix products instead of forward passes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from calibrate.engine.lens import LogitLens
from calibrate.engine.readout import Readout
from calibrate.model.load import LoadedModel


def _read_last(lens: Readout, residual: torch.Tensor, ids: torch.Tensor, last: int) -> np.ndarray:
    """Option logits [N, K] of last-layer residuals [N, H]."""
    return lens.read_layers(residual[:, None, :], [last], ids)[:, 0].cpu().numpy()


class NormForm:
    """The final norm as ``g ⊙ P x / sqrt(|P x|² / H + eps) + beta`` (P: identity for RMSNorm,
    centring for LayerNorm), recognised from the module's own parameters and checked against
    the module on the residuals it will read; None when it is not of this form."""

    def __init__(self, gain: np.ndarray, beta: np.ndarray | None, eps: float, centred: bool):
        self.gain, self.beta, self.eps, self.centred = gain, beta, eps, centred

    def project(self, x: np.ndarray) -> np.ndarray:
        return x - x.mean(axis=-1, keepdims=True) if self.centred else x

    def __call__(self, x: np.ndarray) -> np.ndarray:
        px = self.project(x)
        out = self.gain * px / np.sqrt((px ** 2).mean(axis=-1, keepdims=True) + self.eps)
        return out if self.beta is None else out + self.beta

    @classmethod
    def recognise(cls, norm: torch.nn.Module, sample: torch.Tensor,
                  rtol: float = 1e-4) -> NormForm | None:
        weight = getattr(norm, "weight", None)
        eps = next((getattr(norm, a) for a in ("variance_epsilon", "eps", "epsilon")
                    if isinstance(getattr(norm, a, None), (int, float))), None)
        if eps is None:
            return None
        bias = getattr(norm, "bias", None)
        w = None if weight is None else weight.detach().double().cpu().numpy()
        beta = None if bias is None else bias.detach().double().cpu().numpy()
        gains = [np.ones(sample.shape[-1])] if w is None else [w, 1.0 + w]
        with torch.inference_mode():
            expected = norm(sample).double().cpu().numpy()
        x = sample.double().cpu().numpy()
        scale = max(float(np.abs(expected).max()), 1e-30)
        for centred in (False, True):
            for gain in gains:
                form = cls(gain, beta, float(eps), centred)
                if float(np.abs(form(x) - expected).max()) <= rtol * scale:
                    return form
        return None


class LastLayerReader:
    """Option logits of the last layer's residual ``residual`` [N, H] with ``s · v`` added, for
    many vectors v and scales s, without forward passes.

    With the logit lens whose final norm is recognised (:class:`NormForm`: RMSNorm, Gemma's
    ``1 + weight``, LayerNorm) the read is exact algebra in float64: with x = r + s v and u_k the
    option row times the gain (centred for LayerNorm), logit_k = (u_k·r + s u_k·v) /
    sqrt((|Pr|² + 2 s Pr·v + s² |Pv|²) / H + eps) + c_k, then soft-capping; so one
    [N, H] × [H, D] product serves every scale. Otherwise (another readout or norm) every
    scale is a read of the edited residuals through the readout, in chunks of directions.
    """

    chunk_rows = 1 << 16  # residual rows read at once on the fallback path (memory only)

    def __init__(self, loaded: LoadedModel, residual: np.ndarray, option_ids: np.ndarray,
                 readout: Readout | None = None) -> None:
        self.lens = readout or LogitLens(loaded.adapter)
        self.last = loaded.adapter.num_blocks
        self.residual = np.asarray(residual, dtype=np.float64)
        self.ids = np.asarray(option_ids)
        self.form = None
        if isinstance(self.lens, LogitLens) and len(self.residual):
            sample = torch.as_tensor(self.residual[:8], dtype=torch.float32,
                                     device=self.lens.device)
            form = NormForm.recognise(self.lens.norm, sample)
            if form is not None:
                self._prepare(form)
                if self._agrees(sample):
                    self.form = form

    @property
    def exact(self) -> bool:
        """Whether reads go through the algebra (True) or through the readout (False)."""
        return self.form is not None

    def _prepare(self, form: NormForm) -> None:
        lens, ids = self.lens, self.ids
        self._norm = form
        used = np.unique(ids[ids >= 0])
        rows = lens.weight[torch.as_tensor(used, dtype=torch.long)].detach().double().cpu().numpy()
        self._u = form.project(rows * form.gain)  # [J, H]
        const = np.zeros(len(used)) if form.beta is None else rows @ form.beta
        if lens.bias is not None:
            const = const + lens.bias[torch.as_tensor(used, dtype=torch.long)].double().cpu().numpy()
        self._const = const
        self._slot = np.searchsorted(used, np.maximum(ids, used[0] if len(used) else 0))  # [N, K]
        pr = form.project(self.residual)
        self._pr = pr
        self._q0 = (pr ** 2).mean(axis=-1)  # [N]
        self._a = np.einsum("nkh,nh->nk", self._u[self._slot], self.residual)  # u_k·r = u_k·Pr
        self._form_eps, self._h = form.eps, self.residual.shape[1]

    def _agrees(self, sample: torch.Tensor) -> bool:
        """The algebra against the readout on a few rows, unedited and edited."""
        rng = np.random.default_rng(0)
        v = rng.standard_normal((1, self._h))
        v *= np.linalg.norm(self.residual[0]) / np.linalg.norm(v)
        fast = self._exact(v, np.array([[0.0, 0.5]]), np.arange(len(sample)))  # [1, 2, n, K]
        slow = self._read(v, np.array([[0.0, 0.5]]), np.arange(len(sample)))
        finite = np.isfinite(slow)
        if not np.array_equal(finite, np.isfinite(fast)):
            return False
        scale = max(float(np.abs(slow[finite]).max(initial=0.0)), 1e-30)
        return float(np.abs(fast[finite] - slow[finite]).max(initial=0.0)) <= 1e-4 * scale

    def logits(self, vectors: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """Option logits [D, E, N, K] (float64) of ``residual + scales[d, e] * vectors[d]``;
        ``scales`` [D, E] (or [D]: then [D, N, K])."""
        vectors = np.asarray(vectors, dtype=np.float64)
        scales = np.asarray(scales, dtype=np.float64)
        flat = scales.ndim == 1
        grid = scales[:, None] if flat else scales
        rows = np.arange(len(self.residual))
        out = self._exact(vectors, grid, rows) if self.exact else self._read(vectors, grid, rows)
        return out[:, 0] if flat else out

    def sweep(self, vectors: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """``read(which, scales)``: option logits [m, N, K] of ``residual + scales[i] *
        vectors[which[i]]``, as :meth:`logits` of ``(vectors[which], scales)`` gives them. On the
        exact path each vector's products with the residuals and the option rows are computed
        once here, so the many scales of a search (:func:`calibrate.core.effects.match_scales`)
        cost only the elementwise part of the read."""
        vectors = np.asarray(vectors, dtype=np.float64)
        if not self.exact:
            return lambda which, scales: self.logits(vectors[which], scales)
        rows = np.arange(len(self.residual))
        products = self._products(vectors, rows)

        def read(which: np.ndarray, scales: np.ndarray) -> np.ndarray:
            grid = np.asarray(scales, dtype=np.float64)[:, None]
            return self._combine(*(p[which] for p in products), grid, rows)[:, 0]

        return read

    def _products(self, vectors: np.ndarray, rows: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per vector v: u_j·v [D, J], 2 Pr·Pv / H [D, n] and |Pv|² / H [D]."""
        pv = self._norm.project(vectors)
        b = vectors @ self._u.T  # [D, J]: u_j·v
        q1 = 2.0 * (pv @ self._pr[rows].T) / self._h  # [D, n]
        q2 = (pv ** 2).mean(axis=-1)  # [D]
        return b, q1, q2

    def _exact(self, vectors: np.ndarray, grid: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return self._combine(*self._products(vectors, rows), grid, rows)

    def _combine(self, b: np.ndarray, q1: np.ndarray, q2: np.ndarray, grid: np.ndarray,
                 rows: np.ndarray) -> np.ndarray:
        """Logits [D, E, n, K] at scales ``grid`` [D, E] from :meth:`_products`."""
        slot = self._slot[rows]
        num_a = self._a[rows][None, None]  # [1, 1, n, K]
        num_b = b[:, slot][:, None]  # [D, 1, n, K]
        s = grid[:, :, None, None]  # [D, E, 1, 1]
        # denom = sqrt(q0 + s q1 + s² q2 + eps) and (num_a + s num_b) / denom + c, soft-capped,
        # each step by step in one buffer: the same values as the expressions, without a
        # temporary per step (these arrays are [directions, E, n, .] and a search reads them
        # many times)
        denom = s * q1[:, None, :, None]
        np.add(self._q0[rows][None, None, :, None], denom, out=denom)
        np.add(denom, s ** 2 * q2[:, None, None, None], out=denom)
        np.add(denom, self._form_eps, out=denom)
        np.sqrt(denom, out=denom)
        logits = s * num_b
        np.add(num_a, logits, out=logits)
        np.divide(logits, denom, out=logits)
        np.add(logits, self._const[slot][None, None], out=logits)
        if self.lens.softcap is not None:
            np.divide(logits, self.lens.softcap, out=logits)
            np.tanh(logits, out=logits)
            np.multiply(logits, self.lens.softcap, out=logits)
        missing = self.ids[rows] < 0
        if missing.any():
            np.copyto(logits, -np.inf, where=missing[None, None])
        return logits

    def _read(self, vectors: np.ndarray, grid: np.ndarray, rows: np.ndarray) -> np.ndarray:
        lens = self.lens
        base = torch.as_tensor(self.residual[rows], dtype=torch.float32, device=lens.device)
        ids = torch.as_tensor(self.ids[rows], dtype=torch.long)
        vec = torch.as_tensor(vectors, dtype=torch.float32, device=lens.device)
        out = np.empty((len(vectors), grid.shape[1], len(rows), self.ids.shape[1]))
        step = max(1, self.chunk_rows // max(1, len(rows)))
        with torch.inference_mode():
            for e in range(grid.shape[1]):
                for start in range(0, len(vectors), step):
                    part = slice(start, start + step)
                    shift = torch.as_tensor(grid[part, e], dtype=torch.float32, device=lens.device)
                    edited = base[None] + shift[:, None, None] * vec[part, None, :]  # [d, n, H]
                    read = _read_last(lens, edited.reshape(-1, edited.shape[-1]),
                                      ids.repeat(len(edited), 1), self.last)
                    out[part, e] = read.reshape(len(edited), len(rows), -1)
        return out


def last_layer_logits(loaded: LoadedModel, residual: np.ndarray, option_ids: np.ndarray,
                      vectors: np.ndarray, etas: np.ndarray, scale: float = 1.0,
                      readout: Readout | None = None) -> np.ndarray:
    """Option logits [D, E, N, K] of the last layer with ``eta * scale * vectors[d]`` added to
    ``residual`` [N, H] (the last layer's residual at the last position): the readout's read,
    computed by :class:`LastLayerReader`."""
    etas = np.asarray(etas, dtype=np.float64) * scale
    reader = LastLayerReader(loaded, residual, option_ids, readout)
    return reader.logits(vectors, np.tile(etas, (len(vectors), 1)))


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
