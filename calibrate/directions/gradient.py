"""``direction.method=gradient``: the differentiable readouts and the fit on a job's calibration split.

The vector is added at one layer ℓ (``direction.gradient.layer``; default: the last steering
layer), at the last prompt position, and backpropagation runs only through what the edit
touches:

* ℓ = L (the last layer): the final norm and the option rows of the unembedding (bias and
  soft-capping as the lens applies them) on the probe's cached residuals; no forward pass. For
  cloze prompts only the first continuation token's log-probability changes (the later tokens
  read the context's key/value cache, which the last layer's output does not feed): its
  full-vocabulary log-softmax is recomputed and the option's summed log-likelihood shifted by the
  change, then divided by the ``cloze_norm`` divisor like the probe's scores.
* ℓ < L: the upper blocks ℓ+1..L for the last position only, on the detached key/value cache of
  the rest of the prompt (:mod:`calibrate.engine.upper`), then the same head. Single-token
  formats only: a cloze continuation would read the edited context through its cache.

The fit itself (objectives, penalties, early stopping) is :mod:`calibrate.core.gradient_fit`;
the loss curve is written beside the direction (``gradient_fit.csv`` and ``.png``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from calibrate.core.direction import Direction, DirectionError
from calibrate.core.gradient_fit import (
    CURVE_KEY,
    GradientFit,
    GradientSettings,
    curve_of,
    fit_vector,
)
from calibrate.directions.direction_method import DirectionMethod, FitRequest, register_method
from calibrate.engine.lens import LogitLens, detached_norm
from calibrate.engine.readout import Readout
from calibrate.io import results
from calibrate.model.load import LoadedModel

CURVE_FILE = "gradient_fit.csv"
CURVE_PLOT = "gradient_fit.png"


class OptionHead:
    """The lens read of the options, differentiable and in ``dtype``: final norm, option rows of
    the unembedding (+ bias), soft-capping; -inf where an example has no option in a slot."""

    def __init__(self, loaded: LoadedModel, dtype: torch.dtype = torch.float32,
                 readout: Readout | None = None) -> None:
        if readout is not None and not isinstance(readout, LogitLens):
            raise DirectionError(f"direction.method=gradient differentiates through the logit "
                                 f"lens; the {readout.name} readout is not supported (lens=logit)")
        adapter = loaded.adapter
        self.weight = adapter.unembed_weight.detach()
        self.device = self.weight.device
        self.dtype = dtype
        self.norm = detached_norm(adapter.final_norm, self.device, dtype)
        bias = adapter.unembed_bias
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.softcap = adapter.softcap

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def normalize(self, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(residual.to(self.device, self.dtype))

    def option_logits(self, normed: torch.Tensor, option_ids: torch.Tensor) -> torch.Tensor:
        """normed [R, H], option_ids [R, K] -> [R, K]."""
        ids = option_ids.to(self.device)
        rows = self.weight[ids.clamp(min=0)].to(self.dtype)  # [R, K, H]
        logits = torch.einsum("rh,rkh->rk", normed, rows)
        if self.bias is not None:
            logits = logits + self.bias[ids.clamp(min=0)]
        return self.cap(logits).masked_fill(ids < 0, float("-inf"))

    def log_normalizer(self, normed: torch.Tensor, chunk: int = 32768) -> torch.Tensor:
        """log Σ_v exp(capped logit_v) over the full vocabulary: [R, H] -> [R] (differentiable)."""
        parts = []
        for start in range(0, self.weight.shape[0], chunk):
            logits = normed @ self.weight[start:start + chunk].to(self.dtype).T
            if self.bias is not None:
                logits = logits + self.bias[start:start + chunk]
            parts.append(torch.logsumexp(self.cap(logits), dim=-1))
        return torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)


class LastLayerReadout:
    """Option scores of the last layer's residual + v (single-token, or cloze with ``cloze``).

    ``residual`` [N, H]: the last layer's last-position residuals; ``option_ids`` [N, K]; for
    cloze, ``cloze = (scores [N, K], divisors [N, K])``: the probe's normalized last-layer scores
    and the ``cloze_norm`` divisors (``option_ids`` then holds each option's first token).
    """

    def __init__(self, head: OptionHead, residual: np.ndarray, option_ids: np.ndarray,
                 cloze: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.head = head
        self.base = torch.as_tensor(np.asarray(residual), device=head.device, dtype=head.dtype)
        self.ids = torch.as_tensor(np.asarray(option_ids), dtype=torch.long, device=head.device)
        self.cloze = None
        if cloze is not None:
            scores, divisors = (torch.as_tensor(np.asarray(a, dtype=np.float64), device=head.device)
                                .to(head.dtype) for a in cloze)
            with torch.no_grad():
                first0 = self._first_token_logprob(self.base, self.ids.clamp(min=0))
            self.cloze = (scores, divisors, first0)

    def _first_token_logprob(self, residual: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        normed = self.head.normalize(residual)
        return self.head.option_logits(normed, ids) - self.head.log_normalizer(normed)[:, None]

    def __call__(self, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        edited = self.base[rows] + v.to(self.head.dtype)
        ids = self.ids[rows]
        if self.cloze is None:
            return self.head.option_logits(self.head.normalize(edited), ids)
        scores, divisors, first0 = (t[rows] for t in self.cloze)
        shift = self._first_token_logprob(edited, ids.clamp(min=0)) - first0
        return torch.where(ids < 0, scores, scores + shift / divisors)


class UpperReadout:
    """Option scores when v is added at layer ``start`` < L: the upper blocks run for the last
    position on each batch's detached prefix cache (:func:`calibrate.engine.upper.upper_forward`),
    then the head reads the last layer. Prompts of one of ``groups`` (in-context exemplars) share
    their prefix: it runs once per group and each batch caches only the questions' suffixes."""

    def __init__(self, loaded: LoadedModel, head: OptionHead, prompts: Sequence[str],
                 option_ids: np.ndarray, start: int, batch_size: int = 64,
                 groups: Sequence[str] | None = None) -> None:
        from calibrate.engine.context import suffix_contexts
        from calibrate.engine.prefix import grouped_batches
        from calibrate.engine.probe import ProbeSettings, left_pad, tokenize
        from calibrate.engine.upper import last_states, prefix_states

        self.loaded, self.head, self.start = loaded, head, start
        token_ids = tokenize(loaded, list(prompts))
        if min(len(t) for t in token_ids) < 2:
            raise DirectionError("direction.method=gradient below the last layer needs prompts of "
                                 "at least two tokens")

        def run(idx: np.ndarray, _settings: ProbeSettings, prefix):
            # no_grad, not inference mode: upper_forward differentiates through these caches
            if prefix is not None:
                return last_states(loaded, suffix_contexts(
                    loaded, prefix, [token_ids[i][prefix.length:] for i in idx]))
            ids, mask = left_pad([token_ids[i] for i in idx], loaded.tokenizer.pad_token_id)
            return prefix_states(loaded, ids, mask)

        settings = ProbeSettings(batch_size=batch_size, progress=False,
                                 prefix_reuse=groups is not None)
        self.batches = []  # (state, example indices in the batch's row order)
        self.where = np.empty((len(token_ids), 2), dtype=np.int64)  # example -> (batch, row)
        bases = [None] * len(token_ids)
        for b, (idx, state) in enumerate(grouped_batches(loaded, token_ids, groups, settings, run,
                                                         gapped=True)):
            self.batches.append((state, idx))
            self.where[idx] = np.stack([np.full(len(idx), b), np.arange(len(idx))], axis=1)
            for r, i in enumerate(idx):
                bases[i] = state.residuals[r, start]
        self.base = torch.stack(bases).to(head.device)  # [N, H] residual at layer start
        self.ids = torch.as_tensor(np.asarray(option_ids), dtype=torch.long, device=head.device)

    def last_layer(self, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The last layer's last-position residual [R, H] of ``rows`` with v added at ``start``."""
        from calibrate.engine.upper import upper_forward

        rows_np = rows.cpu().numpy()
        out: list[torch.Tensor | None] = [None] * len(rows_np)
        model_dtype = self.base.dtype
        for b, (state, _) in enumerate(self.batches):
            sel = np.nonzero(self.where[rows_np, 0] == b)[0]
            if not len(sel):
                continue
            local = torch.as_tensor(self.where[rows_np[sel], 1], dtype=torch.long)
            hidden = self.base[rows[sel]] + v.to(model_dtype)
            upper = upper_forward(self.loaded, state, self.start, hidden, local)
            for r, s in enumerate(sel):
                out[s] = upper[r, -1]
        return torch.stack(out)

    def __call__(self, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        last = self.last_layer(v, rows)
        return self.head.option_logits(self.head.normalize(last), self.ids[rows])


def fit_gradient(loaded: LoadedModel, prompt_set: Any, cal_idx: np.ndarray, layer: int,
                 residual: np.ndarray | None, settings: GradientSettings, seed: int,
                 probe_scores: np.ndarray | None = None, dtype: torch.dtype = torch.float32,
                 prefix_reuse: bool = True, readout: Readout | None = None) -> GradientFit:
    """Fit the vector at ``layer`` on the calibration rows ``cal_idx`` of ``prompt_set``.

    ``residual`` [n_cal, H]: the last-position residual at the last layer (needed there);
    ``probe_scores`` [n_cal, K]: the probe's last-layer scores (cloze only); ``prefix_reuse``
    (``probe.prefix_reuse``): below the last layer, run a shared exemplar prefix once per group.
    """
    num_blocks = loaded.adapter.num_blocks
    if not 0 <= layer <= num_blocks:
        raise DirectionError(f"direction.gradient.layer={layer}: must be in 0..{num_blocks}")
    head = OptionHead(loaded, dtype, readout)
    option_ids = prompt_set.option_ids[cal_idx]
    labels = prompt_set.labels[cal_idx]
    if layer == num_blocks:
        cloze = None
        if prompt_set.is_cloze:
            from calibrate.tasks.continuations import cloze_divisors

            requests = [prompt_set.requests[i] for i in cal_idx]
            divisors = np.ones(option_ids.shape, dtype=np.float64)
            found = cloze_divisors(requests, prompt_set.cloze_norm or "none")
            divisors[:, :found.shape[1]] = found
            cloze = (probe_scores, divisors)
        readout = LastLayerReadout(head, residual, option_ids, cloze)
        base = readout.base
    else:
        if prompt_set.is_cloze:
            raise DirectionError(
                f"direction.method=gradient at layer {layer} < {num_blocks} with cloze prompts: "
                "the continuations would read the edited context through its cache, which the "
                "fit does not model; fit at the last layer (direction.gradient.layer="
                f"{num_blocks}) or use a single-token answer format")
        groups = None
        if prefix_reuse and prompt_set.groups is not None:
            groups = [prompt_set.groups[i] for i in cal_idx]
        readout = UpperReadout(loaded, head, [prompt_set.prompts[i] for i in cal_idx], option_ids,
                               layer, groups=groups)
        base = readout.base
    scale = float(base.double().norm(dim=-1).mean())
    with torch.enable_grad():
        fit = fit_vector(readout, base.shape[-1], labels, settings, scale, seed, head.dtype,
                         head.device)
    fit.direction.meta.update(layers=[int(layer)], fit_layer=int(layer),
                              fit_position="last", cloze=bool(prompt_set.is_cloze),
                              **{CURVE_KEY: {c: fit.curve[c].tolist() for c in fit.curve.columns}})
    return fit


def fit_layer(settings: GradientSettings, steer_layers: Sequence[int]) -> int:
    """The layer the vector is fit at: ``direction.gradient.layer``, else the last steering layer."""
    return int(settings.layer) if settings.layer is not None else max(steer_layers)


@register_method
class Gradient(DirectionMethod):
    """One vector fit by gradient descent with the model frozen (module docstring)."""

    name = "gradient"
    Settings = GradientSettings

    def extra_layers(self, settings: Any, steer_layers: Sequence[int], last: int) -> list[int]:
        layer = fit_layer(settings, steer_layers)
        return [layer] if layer == last else []

    def check_shape(self, settings: Any, num_blocks: int) -> None:
        if settings.layer is not None and not 0 <= settings.layer <= num_blocks:
            raise DirectionError(f"direction.gradient.layer={settings.layer}: outside this "
                                 f"model's 0..{num_blocks}; accepted: layer numbers in "
                                 f"0..{num_blocks}")

    def fit(self, request: FitRequest) -> Direction:
        layer = fit_layer(request.settings, request.steer_layers)
        residual = scores = None
        if layer == request.last_layer:
            result = request.result()
            residual = result.residuals[layer][request.cal_idx]
            scores = result.option_logits[request.cal_idx, -1]
        return fit_gradient(request.loaded, request.prompt_set, request.cal_idx, layer, residual,
                            request.settings, request.seed, scores,
                            prefix_reuse=request.prefix_reuse, readout=request.readout).direction

    def write_files(self, direction: Direction, folder: Path, plots: bool) -> list[Path]:
        curve = curve_of(direction)
        if curve is None:
            return []
        paths = [results.write_csv(Path(folder) / CURVE_FILE, curve)]
        if plots:
            paths.append(plot_fit_curve(curve, Path(folder) / CURVE_PLOT, direction.meta))
        return paths


def plot_fit_curve(curve: pd.DataFrame, path: Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Training and held-out loss against step, the kept step marked, and ||v|| on a twin axis."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    meta = meta or {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(curve["step"], curve["train_objective"], label="train objective")
    if curve["holdout_objective"].notna().any():
        ax.plot(curve["step"], curve["holdout_objective"], label="held-out objective")
    if "best_step" in meta:
        ax.axvline(meta["best_step"], color="grey", ls=":", label="kept step")
    ax.set_xlabel("step")
    ax.set_ylabel(str((meta.get("gradient") or {}).get("objective", "objective")))
    twin = ax.twinx()
    twin.plot(curve["step"], curve["norm"], color="tab:green", alpha=0.5, label="|v|")
    twin.set_ylabel("|v|")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"gradient fit at layer {meta.get('fit_layer', '?')}")
    fig.tight_layout()
    results.atomic_write(Path(path), lambda h: fig.savefig(h, format="png", dpi=110))
    plt.close(fig)
    return Path(path)
