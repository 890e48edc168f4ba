"""Load a model and its tokenizer by config: offline packaged copy, local folder or hub id."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibrate.adapters import Adapter, check_supported, get_adapter
from calibrate.assets import prepare_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelConfigError(ValueError):
    """A model config value is invalid."""


@dataclass
class LoadedModel:
    """A causal LM ready for probing, with where it came from."""

    name: str
    source: str  # the folder or hub id the weights were read from
    model: nn.Module
    tokenizer: Any
    adapter: Adapter
    unembed_hash: str

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where input ids go)."""
        return self.model.get_input_embeddings().weight.device


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` is bfloat16 on GPU and float32 on CPU; otherwise the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in _DTYPES:
        raise ModelConfigError(f"model.dtype={name!r}; accepted: auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def resolve_device(name: str) -> str:
    """``auto`` is cuda when available, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_source(cfg: Mapping[str, Any], cache_dir: str | Path | None = None) -> str:
    """The folder or hub id to load: ``path`` if set, else the prepared offline copy."""
    if cfg.get("path"):
        return str(cfg["path"])
    if cfg.get("offline"):
        return str(prepare_model(cfg["name"], cfg["offline"], cache_dir))
    raise ModelConfigError(f"model {cfg.get('name')!r} has neither model.path nor an offline copy")


def tensor_hash(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype)."""
    data = tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def check_architecture(source: str, cfg: Mapping[str, Any]) -> str:
    """The ``model_type`` of ``source`` read from its config alone; an error if it has no adapter."""
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(source, revision=cfg.get("revision"),
                                               trust_remote_code=bool(cfg.get("trust_remote_code")))
    except OSError as err:  # a missing folder, or a hub id neither cached nor reachable
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelConfigError(f"model {source!r} cannot be loaded ({reason}); accepted: a local "
                               "model folder, or a hub id that is cached or reachable") from err
    check_supported(hf_config.model_type)
    return hf_config.model_type


def _from_pretrained(source: str, cfg: Mapping[str, Any], dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    common = {"revision": cfg.get("revision"), "trust_remote_code": bool(cfg.get("trust_remote_code"))}
    check_architecture(source, cfg)  # before the weights are read
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, **common}
    if cfg.get("device_map"):
        kwargs["device_map"] = cfg["device_map"]
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if not cfg.get("device_map"):
        model = model.to(device)
    return model


def load_tokenizer(source: str, cfg: Mapping[str, Any]) -> Any:
    """The model's tokenizer with left padding and a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=cfg.get("revision"), trust_remote_code=bool(cfg.get("trust_remote_code")))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_LOADED: dict[str, LoadedModel] = {}


def _reuse_key(cfg: Mapping[str, Any], cache_dir: str | Path | None) -> str:
    keys = ("name", "path", "offline", "revision", "dtype", "device", "device_map", "trust_remote_code")
    return json.dumps({**{k: cfg.get(k) for k in keys}, "cache": str(cache_dir)}, sort_keys=True,
                      default=str)


def load_model(cfg: Mapping[str, Any], cache_dir: str | Path | None = None,
               tokenizer: Any = None, reuse: bool = True) -> LoadedModel:
    """Load the model named by a model config (see ``conf/model``), in eval mode, frozen.

    With ``reuse`` the last model loaded in this process is handed back when the config is the
    same (a multirun over eta runs its jobs in one process and must not reload the model).
    """
    key = _reuse_key(cfg, cache_dir)
    if reuse and key in _LOADED:
        return _LOADED[key]
    _LOADED.clear()  # hold at most one model: a sweep over models must not keep them all
    loaded = _load_model(cfg, cache_dir, tokenizer)
    if reuse:
        _LOADED[key] = loaded
    return loaded


def _load_model(cfg: Mapping[str, Any], cache_dir: str | Path | None, tokenizer: Any) -> LoadedModel:
    device = resolve_device(str(cfg.get("device", "auto")))
    dtype = resolve_dtype(str(cfg.get("dtype", "auto")), device)
    source = resolve_source(cfg, cache_dir)
    model = _from_pretrained(source, cfg, dtype, device)
    model.eval()
    model.requires_grad_(False)
    adapter = get_adapter(model)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source, cfg)
    return LoadedModel(str(cfg["name"]), source, model, tokenizer, adapter,
                       tensor_hash(adapter.unembed_weight))


def wrap_model(model: nn.Module, tokenizer: Any, name: str = "custom") -> LoadedModel:
    """Wrap an already-built model (e.g. a tiny random one in tests) as a :class:`LoadedModel`."""
    model.eval()
    model.requires_grad_(False)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    adapter = get_adapter(model)
    return LoadedModel(name, name, model, tokenizer, adapter, tensor_hash(adapter.unembed_weight))
