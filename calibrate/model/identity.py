"""What was actually loaded: a :class:`LoadedModel` carries its source, revision, parameter dtype,
device, ``model_type`` and a fingerprint of its weights (:meth:`LoadedModel.identity`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from calibrate.model.adapters import Adapter

_SAMPLE_BYTES = 1 << 16


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and its first and last 64 KiB of bytes.

    Cheap for a 7B model (no full pass over the weights) and changes with any fine-tune,
    re-quantization, cast or different checkpoint in practice.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        raw = (tensor.detach().reshape(-1).view(torch.uint8) if tensor.numel()
               else tensor.new_empty(0, dtype=torch.uint8))  # bf16 has no numpy dtype
        head, tail = raw[:_SAMPLE_BYTES].cpu().numpy(), raw[-_SAMPLE_BYTES:].cpu().numpy()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(head.tobytes())
        digest.update(tail.tobytes())
    return digest.hexdigest()


def tensor_hash(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype)."""
    data = tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _param_dtype(model: nn.Module) -> torch.dtype:
    """The dtype holding most parameter elements (in practice the only one)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


@dataclass
class LoadedModel:
    """A causal LM ready for probing, with the identity of what was actually loaded."""

    name: str
    source: str  # the hub id, or the absolute path of the folder the weights were read from
    model: nn.Module
    tokenizer: Any
    adapter: Adapter
    unembed_hash: str
    revision: str | None = None  # the requested revision (null: the default branch)
    commit: str | None = None  # the hub commit actually loaded, when known
    dtype: torch.dtype = field(default=None)  # the parameters' dtype at load
    fingerprint: str = ""  # weights_fingerprint(model) at load

    def __post_init__(self) -> None:
        if self.dtype is None:
            self.dtype = _param_dtype(self.model)
        if not self.fingerprint:
            self.fingerprint = weights_fingerprint(self.model)

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where input ids go)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def model_type(self) -> str:
        return self.adapter.model_type

    def identity(self) -> dict[str, Any]:
        """What was loaded, JSON-serialisable (for metrics.json and cache keys)."""
        dtypes = sorted({_dtype_name(p.dtype) for p in self.model.parameters()})
        devices = sorted({str(p.device) for p in self.model.parameters()})
        return {
            "name": self.name, "source": self.source, "revision": self.revision,
            "commit": self.commit, "model_type": self.model_type, "dtype": _dtype_name(self.dtype),
            "param_dtypes": dtypes, "device": str(self.device), "devices": devices,
            "num_blocks": self.adapter.num_blocks,
            "hidden_size": int(self.adapter.unembed_weight.shape[1]),
            "fingerprint": self.fingerprint, "unembed_hash": self.unembed_hash,
        }
