"""A lens with one affine translator per layer, and the tuned-lens library's file format.

:class:`TranslatedLens` reads layer ℓ's residual h as the logit lens reads ``h + W_ℓ h + b_ℓ``
(the residual form of the tuned lens: zero translators are the logit lens itself, exactly), then
the model's own final norm and unembedding (:class:`~calibrate.engine.lens.LogitLens`). The last
layer has no translator: it is read as the model reads it. The tuned lens (:mod:`.tuned_lens`)
and the affine shortcut (:mod:`.affine_lens`) are both this readout, fit differently.

The file format is the one of the ``tuned-lens`` library (AlignmentResearch/tuned-lens,
``tuned_lens/nn/lenses.py``): a folder with

* ``config.json``: ``TunedLensConfig`` as a dict — ``base_model_name_or_path``, ``d_model``,
  ``num_hidden_layers`` (translators: one per layer below the last), ``bias``,
  ``base_model_revision``, ``unembed_hash``, ``lens_type`` (``"linear_tuned_lens"``);
* ``params.pt``: ``torch.save`` of the ``layer_translators`` ``ModuleList``'s state dict,
  ``"{i}.weight"`` [d_model, d_model] (a ``torch.nn.Linear`` weight: out x in) and
  ``"{i}.bias"`` [d_model] for i = 0 .. num_hidden_layers - 1; translator i reads the library's
  ``hidden_states[i]``, which is our layer i (the embedding output is layer 0).

so a lens trained by the library loads with ``lens.path=<folder>`` and ours loads in it
(``TunedLens.from_unembed_and_pretrained``).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from calibrate.engine.lens import LogitLens
from calibrate.errors import ConfigError
from calibrate.io import results
from calibrate.model.adapters import Adapter

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.pt"
LENS_TYPE = "linear_tuned_lens"


class TranslatedLens(LogitLens):
    """The logit lens of ``h + W_ℓ h + b_ℓ`` at every layer ℓ below the last; the last layer
    as the model reads it. ``weight`` [L, H, H] (``torch.nn.Linear`` layout, out x in) and
    ``bias`` [L, H] hold the translators of layers 0 .. L - 1 (L = the number of blocks)."""

    name: ClassVar[str] = "translated"

    def __init__(self, adapter: Adapter, weight: torch.Tensor, bias: torch.Tensor,
                 identity: str, summary: dict[str, Any] | None = None) -> None:
        super().__init__(adapter)
        blocks, hidden = adapter.num_blocks, int(adapter.unembed_weight.shape[1])
        if tuple(weight.shape) != (blocks, hidden, hidden) or tuple(bias.shape) != (blocks, hidden):
            raise ConfigError(f"translators of shape {tuple(weight.shape)} / {tuple(bias.shape)} "
                              f"do not fit this model; accepted: [{blocks}, {hidden}, {hidden}] "
                              f"/ [{blocks}, {hidden}]")
        zero_w = torch.zeros((1, hidden, hidden), dtype=torch.float32)
        zero_b = torch.zeros((1, hidden), dtype=torch.float32)
        # every layer 0 .. L, the last one a zero translator (it is never applied)
        self.weight_t = torch.cat([weight.detach().float().cpu(), zero_w]).transpose(1, 2) \
            .contiguous().to(self.device)  # [L+1, in, out]
        self.bias_all = torch.cat([bias.detach().float().cpu(), zero_b]).to(self.device)
        self.last = blocks
        self._identity = identity
        self._summary = dict(summary or {})

    @property
    def translators(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [L, H, H] out x in, bias [L, H]) of the layers below the last, float32."""
        return (self.weight_t[:-1].transpose(1, 2).contiguous(), self.bias_all[:-1])

    def translate(self, residual: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
        """``h + W_ℓ h + b_ℓ`` of residuals [..., L', H] of ``layers`` (float32); the last layer
        unchanged."""
        h = residual.to(device=self.device, dtype=torch.float32)
        idx = [int(layer) for layer in layers]
        if len(idx) != h.shape[-2]:
            raise ValueError(f"{len(idx)} layers for {h.shape[-2]} residual slices")
        below = [i for i, layer in enumerate(idx) if layer != self.last]
        if not below:
            return h
        sel = torch.tensor([idx[i] for i in below], device=self.device)
        part = h[..., below, :]  # [..., l, H]
        moved = part + torch.einsum("...li,lio->...lo", part, self.weight_t[sel]) \
            + self.bias_all[sel]
        if len(below) == len(idx):
            return moved
        out = h.clone()
        out[..., below, :] = moved
        return out

    def prepare(self, residual: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
        """The final norm of every layer's translated residual."""
        return self.normalize(self.translate(residual, layers))

    @property
    def identity(self) -> str:
        return self._identity

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "identity": self._identity, **self._summary}


# ---------------------------------------------------------------- the tuned-lens file format

def unembed_hash(weight: torch.Tensor) -> str:
    """The tuned-lens library's hash of the unembedding (``tuned_lens.utils.tensor_hash``):
    sha256 of ``numpy.array_str(W, precision=1)`` (bfloat16 weights are read as float32)."""
    w = weight.detach().cpu()
    if w.dtype == torch.bfloat16:
        w = w.float()
    return hashlib.sha256(str.encode(np.array_str(w.numpy(), precision=1))).hexdigest()


def save_lens(folder: str | Path, weight: torch.Tensor, bias: torch.Tensor, *,
              base_model: str, unembedding: torch.Tensor, revision: str | None = None) -> Path:
    """Write translators [L, H, H] / [L, H] in the tuned-lens format (``config.json`` +
    ``params.pt``), each file atomically."""
    folder = Path(folder)
    layers, hidden = int(weight.shape[0]), int(weight.shape[-1])
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i in range(layers):
        state[f"{i}.weight"] = weight[i].detach().float().cpu().clone()
        state[f"{i}.bias"] = bias[i].detach().float().cpu().clone()
    config = {"base_model_name_or_path": base_model, "d_model": hidden,
              "num_hidden_layers": layers, "bias": True, "base_model_revision": revision,
              "unembed_hash": unembed_hash(unembedding), "lens_type": LENS_TYPE}
    results.atomic_write(folder / PARAMS_FILE, lambda handle: torch.save(state, handle))
    results.write_text(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return folder


def read_config(folder: Path, key: str = "lens.path") -> dict[str, Any]:
    """The lens folder's ``config.json``, checked to be a linear tuned lens."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}={str(folder)!r}: cannot read {CONFIG_FILE} ({err}); accepted: "
                          f"a tuned-lens folder with {CONFIG_FILE} and {PARAMS_FILE}") from None
    if not isinstance(config, dict) or config.get("lens_type", LENS_TYPE) != LENS_TYPE:
        kind = config.get("lens_type") if isinstance(config, dict) else type(config).__name__
        raise ConfigError(f"{key}={str(folder)!r}: lens_type {kind!r}; accepted: {LENS_TYPE!r}")
    for name in ("d_model", "num_hidden_layers"):
        if isinstance(config.get(name), bool) or not isinstance(config.get(name), int):
            raise ConfigError(f"{key}={str(folder)!r}: {CONFIG_FILE} has no integer {name!r}; "
                              "accepted: a tuned-lens config")
    return config


def load_lens(folder: str | Path, num_blocks: int, hidden: int, key: str = "lens.path"
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Translators (weight [L, H, H], bias [L, H], float32) and config of a tuned-lens folder,
    checked against the model's shape (L blocks of width H)."""
    folder = Path(folder)
    config = read_config(folder, key)
    shape = (config["num_hidden_layers"], config["d_model"])
    if shape != (num_blocks, hidden):
        raise ConfigError(f"{key}={str(folder)!r} holds {shape[0]} translators of width "
                          f"{shape[1]}; this model needs {num_blocks} of width {hidden}")
    try:
        state = torch.load(folder / PARAMS_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is the same bad input
        raise ConfigError(f"{key}={str(folder)!r}: cannot read {PARAMS_FILE} "
                          f"({type(err).__name__}); accepted: the tuned-lens library's "
                          "state dict of layer_translators") from None
    weight = torch.zeros((num_blocks, hidden, hidden), dtype=torch.float32)
    bias = torch.zeros((num_blocks, hidden), dtype=torch.float32)
    expected = {f"{i}.weight" for i in range(num_blocks)}
    if config.get("bias", True):
        expected |= {f"{i}.bias" for i in range(num_blocks)}
    if not isinstance(state, dict) or set(state) != expected:
        found = sorted(state)[:4] if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"{key}={str(folder)!r}: {PARAMS_FILE} keys {found}…; accepted: "
                          f"'0.weight', '0.bias' … '{num_blocks - 1}.bias'")
    for i in range(num_blocks):
        w = state[f"{i}.weight"]
        if tuple(w.shape) != (hidden, hidden):
            raise ConfigError(f"{key}={str(folder)!r}: {i}.weight has shape {tuple(w.shape)}; "
                              f"accepted: ({hidden}, {hidden})")
        weight[i] = w.float()
        if f"{i}.bias" in state:
            bias[i] = state[f"{i}.bias"].float().reshape(hidden)
    return weight, bias, config


def file_digest(folder: str | Path) -> str:
    """sha256 of a lens folder's ``params.pt`` (what decides its reads; the config only names
    the model and shape)."""
    return hashlib.sha256((Path(folder) / PARAMS_FILE).read_bytes()).hexdigest()
