"""``lens=probe``: a supervised linear probe of the answer at every layer, fit on the
calibration split — the ceiling of what is linearly decodable, and the calibration of a probe.

At every layer ℓ (the last one too), a multinomial logistic regression from the last prompt
position's residual h_ℓ to the answer option, fit on the job's calibration split (its labels:
the only readout that reads them) and read on the evaluated rows. It is scikit-learn's
``LogisticRegression(C=lens.c)`` (L2 on the weights, intercept unpenalised, lbfgs; for two
options the binary model with one weight vector, class 1's logit w·h + b against 0), on
features standardized with the calibration split's mean and standard deviation (as
``StandardScaler``; ``lens.standardize``), minimised with scipy's L-BFGS-B to ``lens.tol``.
A class is an option slot (A, B, C, D; or the verbalizer's words in order): the option tokens
are recorded and a prompt set with other tokens in a slot is refused. Rows with fewer options
than slots are fit and read with the missing slots left out of the softmax.

It reads only the options (``full_vocabulary = False``): cloze scoring and the full-vocabulary
option mass are refused in one line before the job starts, and it does not map to the model's
vocabulary, so no KL to the final layer is reported (``kl_to_final: null``). Cached under
``<cache>/lenses/probe/<key>/`` keyed by the weights, the calibration prompts, labels and
option tokens, and the settings.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.optimize import minimize

from calibrate import values
from calibrate.engine.probe import ProbeSettings, run_probe
from calibrate.engine.readout import Readout
from calibrate.errors import ConfigError
from calibrate.readouts import lens_cache
from calibrate.readouts.readout_kind import ReadoutKind, ReadoutSource, register_readout

LOG = logging.getLogger("calibrate")
PARAMS_FILE = "probe.pt"


@dataclass
class OptionProbeSettings:
    """``lens=probe``: the logistic regression fit at every layer."""

    name: str = "probe"
    c: float = 1.0  # scikit-learn's C: inverse L2 strength on the weights
    standardize: bool = True  # z-score each residual coordinate on the calibration split first
    max_iter: int = 1000  # L-BFGS-B iterations per layer
    tol: float = 1e-6  # L-BFGS-B's projected-gradient tolerance (scikit-learn's tol)

    def __post_init__(self) -> None:
        values.choice("lens", self.name, ("probe",))
        values.number("lens.c", self.c, lambda v: v > 0, "a number > 0")
        values.flag("lens.standardize", self.standardize)
        values.integer("lens.max_iter", self.max_iter, 1)
        values.number("lens.tol", self.tol, lambda v: v > 0, "a number > 0")


# ---------------------------------------------------------------- the fit (numpy, float64)

def _scores(x: np.ndarray, w: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Class logits [n, K] of features [n, H] (binary: [0, w·x + b]); -inf where masked."""
    z = x @ w.T + b  # [n, K']
    if w.shape[0] == 1:
        z = np.concatenate([np.zeros_like(z), z], axis=1)
    return np.where(mask, z, -np.inf)


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, c: float, max_iter: int,
                 tol: float, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """scikit-learn's L2 logistic regression: minimises mean NLL + ‖W‖² / (2 C n) (intercept
    unpenalised); binary (one weight vector) for two classes, else multinomial. ``mask`` [n, K]
    leaves classes out of a row's softmax. Returns (W [K', H], b [K'], iterations)."""
    n, hidden = x.shape
    k = 1 if n_classes == 2 else n_classes
    mask = np.ones((n, n_classes), bool) if mask is None else mask
    onehot = np.eye(n_classes)[y]
    strength = 1.0 / (c * n)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:k * hidden].reshape(k, hidden), theta[k * hidden:]
        z = _scores(x, w, b, mask)
        top = z.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
        nll = lse - (onehot * np.where(mask, z, 0.0)).sum(axis=1)
        prob = np.exp(z - lse[:, None])
        err = (prob - onehot) / n  # d mean-NLL / d z
        if k == 1:
            err = err[:, 1:]
        grad_w = err.T @ x + strength * w
        loss = nll.mean() + 0.5 * strength * float((w * w).sum())
        return loss, np.concatenate([grad_w.ravel(), err.sum(axis=0)])

    theta0 = np.zeros(k * hidden + k)
    res = minimize(objective, theta0, jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "gtol": tol, "maxls": 50,
                            "ftol": 64 * np.finfo(float).eps})
    theta = res.x
    return theta[:k * hidden].reshape(k, hidden), theta[k * hidden:], int(res.nit)


# ---------------------------------------------------------------- the readout

@dataclass
class ProbeState:
    """Standardized residuals [..., L', H] and the layers they are of."""

    features: torch.Tensor
    layers: torch.Tensor


class OptionProbe(Readout):
    """Per-layer logistic regressions of the answer slot (see the module docstring)."""

    name: ClassVar[str] = "probe"
    full_vocabulary: ClassVar[bool] = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                 scale: torch.Tensor, slot_tokens: Sequence[int], device: torch.device,
                 identity: str, summary: dict[str, Any] | None = None) -> None:
        self.device = device
        self.weight = weight.double().to(device)  # [L+1, K', H]
        self.bias = bias.double().to(device)  # [L+1, K']
        self.mean = mean.double().to(device)  # [L+1, H]
        self.scale = scale.double().to(device)  # [L+1, H]
        self.slot_tokens = torch.as_tensor(list(slot_tokens), dtype=torch.long, device=device)
        self._identity = identity
        self._summary = dict(summary or {})

    def prepare(self, residual: torch.Tensor, layers: Sequence[int]) -> ProbeState:
        idx = torch.as_tensor([int(layer) for layer in layers], device=self.device)
        h = residual.to(device=self.device, dtype=torch.float64)
        return ProbeState((h - self.mean[idx]) / self.scale[idx], idx)

    def option_logits(self, state: ProbeState, option_ids: torch.Tensor) -> torch.Tensor:
        ids = option_ids.to(self.device)
        k = int(self.slot_tokens.shape[0])
        if ids.shape[-1] != k or bool(((ids >= 0) & (ids != self.slot_tokens)).any()):
            raise ConfigError(f"lens=probe was fit on the option tokens {self.slot_tokens.tolist()} "
                              f"and is asked to read others; accepted: prompts whose option slots "
                              "hold the tokens it was fit on (the job's dataset and format)")
        z = torch.einsum("...lh,lkh->...lk", state.features, self.weight[state.layers]) \
            + self.bias[state.layers]
        if self.weight.shape[1] == 1:
            z = torch.cat([torch.zeros_like(z), z], dim=-1)
        return z.float().masked_fill((ids < 0).unsqueeze(-2), float("-inf"))

    @property
    def identity(self) -> str:
        return self._identity

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "identity": self._identity, **self._summary}


def slot_tokens(option_ids: np.ndarray) -> list[int]:
    """The token of each option slot, the same in every row (-1 rows aside); refused otherwise."""
    out = []
    for k in range(option_ids.shape[1]):
        present = np.unique(option_ids[:, k][option_ids[:, k] >= 0])
        if len(present) != 1:
            raise ConfigError(f"lens=probe: option slot {k} holds {len(present)} different tokens "
                              "across the calibration rows; accepted: letters or verbalizer "
                              "prompts, one token per slot")
        out.append(int(present[0]))
    return out


def fit_probe(residuals: dict[int, np.ndarray], labels: np.ndarray, option_ids: np.ndarray,
              settings: OptionProbeSettings) -> dict[str, Any]:
    """Per-layer fit: weight [L+1, K', H], bias [L+1, K'], mean, scale [L+1, H], and each
    layer's training accuracy, mean NLL and iterations."""
    mask = option_ids >= 0
    n_classes = option_ids.shape[1]
    out: dict[str, list] = {k: [] for k in ("weight", "bias", "mean", "scale", "train_accuracy",
                                            "train_nll", "iterations")}
    for layer in sorted(residuals):
        x = residuals[layer].astype(np.float64)
        mean = x.mean(axis=0) if settings.standardize else np.zeros(x.shape[1])
        scale = x.std(axis=0) if settings.standardize else np.ones(x.shape[1])
        scale = np.where(scale > 0, scale, 1.0)
        xs = (x - mean) / scale
        w, b, iters = fit_logistic(xs, labels, n_classes, settings.c, settings.max_iter,
                                   settings.tol, mask)
        z = _scores(xs, w, b, mask)
        logp = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
        for name, value in (("weight", w), ("bias", b), ("mean", mean), ("scale", scale)):
            out[name].append(value)
        out["train_accuracy"].append(float((z.argmax(1) == labels).mean()))
        out["train_nll"].append(float(-logp[np.arange(len(labels)), labels].mean()))
        out["iterations"].append(iters)
    return out


def _prompts_digest(prompts: Any) -> str:
    h = hashlib.sha256("\x00".join(prompts.prompts).encode())
    for array in (prompts.labels, prompts.option_ids):
        h.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return h.hexdigest()


@register_readout
class Probe(ReadoutKind):
    """Every layer through a logistic regression of the answer fit on the calibration split."""

    name = "probe"
    Settings = OptionProbeSettings
    full_vocabulary = False

    def fits_on_prompts(self, settings: OptionProbeSettings) -> bool:
        return True

    def build(self, settings: OptionProbeSettings, source: ReadoutSource) -> OptionProbe:
        cal = source.calibration_prompts
        if cal is None:
            raise ConfigError("lens=probe is fit on the job's calibration split, and this job "
                              "has none; accepted: a study with a split (every study, probe "
                              "included, has one with a fitted lens)")
        if cal.is_cloze:
            raise ConfigError("lens=probe reads only the answer options; accepted: "
                              "dataset.answer_format=letters or verbalizer")
        slots = slot_tokens(cal.option_ids)
        key = lens_cache.fit_key(self.name, source.loaded, _prompts_digest(cal), asdict(settings))
        identity = f"{self.name}:{key[:24]}"
        device = source.loaded.adapter.unembed_weight.device
        cached = lens_cache.load(self.name, key, source.cache_dir)
        if cached is not None:
            folder, record = cached
            state = torch.load(folder / PARAMS_FILE, map_location="cpu", weights_only=True)
            LOG.info("probe lens: cached fit %s", folder)
            return OptionProbe(state["weight"], state["bias"], state["mean"], state["scale"],
                               state["slot_tokens"].tolist(), device, identity,
                               {**record["summary"], "cache": str(folder)})
        start = time.perf_counter()
        layers = range(source.loaded.adapter.num_blocks + 1)
        result = run_probe(source.loaded, cal, ProbeSettings(option_mass="none", progress=False)
                           .keeping(layers))
        fit = fit_probe(result.residuals, cal.labels, cal.option_ids, settings)
        tensors = {name: torch.as_tensor(np.stack(fit[name])) for name in
                   ("weight", "bias", "mean", "scale")}
        tensors["slot_tokens"] = torch.as_tensor(slots, dtype=torch.long)
        ident = source.loaded.identity()
        summary = {"fit_on": {**(source.split or {}), "rows": len(cal.labels),
                              "labels": "calibration split answers"},
                   "model_fingerprint": ident["fingerprint"], "model_dtype": ident["dtype"],
                   "settings": asdict(settings), "option_strings": list(cal.option_strings),
                   "slot_tokens": slots, "kl_to_final": None,
                   "train_accuracy": fit["train_accuracy"], "train_nll": fit["train_nll"],
                   "iterations": fit["iterations"],
                   "fit_seconds": round(time.perf_counter() - start, 3)}
        folder = lens_cache.store(self.name, key, source.cache_dir, {"summary": summary},
                                  lambda tmp: torch.save(tensors, tmp / PARAMS_FILE))
        return OptionProbe(tensors["weight"], tensors["bias"], tensors["mean"], tensors["scale"],
                           slots, device, identity,
                           {**summary, "cache": None if folder is None else str(folder)})
