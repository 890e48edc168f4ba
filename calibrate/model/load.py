"""Load a model and its tokenizer by config: offline packaged copy, local folder or hub id.

The pipeline, one module per step; each failure is one :class:`ModelConfigError` line:

1. :mod:`~calibrate.model.config`: the ``model`` config, typed once (:class:`ModelConfig`);
2. :mod:`~calibrate.model.devices`: the device and dtype (:func:`check_device`);
3. :mod:`~calibrate.model.source`: where the model comes from (a local folder, a hub id in the
   local Hugging Face cache, or a reachable hub: :func:`resolve_source`, :func:`check_source`);
4. :mod:`~calibrate.model.shape`: its architecture and sizes from its config alone
   (:func:`check_architecture`, :func:`model_shape`);
5. :mod:`~calibrate.model.weights`: the integrity of its safetensors files (:func:`check_weights`);
6. here: the weights and tokenizer, read, wrapped as a :class:`LoadedModel` that carries its real
   identity (:mod:`~calibrate.model.identity`: source, revision, dtype, device, fingerprint).

The names of those modules that other packages use are importable from here too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibrate.io.paths import REGULAR, entry_kind
from calibrate.model.adapters import get_adapter
from calibrate.model.config import ModelConfig, ModelConfigError, one_line
from calibrate.model.devices import available_devices, check_device, resolve_device, resolve_dtype
from calibrate.model.identity import LoadedModel, tensor_hash, weights_fingerprint
from calibrate.model.loadinfo import quiet_load_report, weight_mismatch
from calibrate.model.shape import ModelShape, check_architecture, model_shape
from calibrate.model.source import (
    HUB_PROBE_TIMEOUT_S,
    cached_config,
    check_source,
    hub_endpoint,
    hub_offline,
    hub_reachable,
    local_dir,
    resolve_source,
)
from calibrate.model.weights import check_weights

__all__ = [
    "HUB_PROBE_TIMEOUT_S", "TOKENIZER_FILES", "LoadedModel", "ModelConfig", "ModelConfigError",
    "ModelShape", "available_devices", "check_architecture", "check_device",
    "check_loading_info", "check_source", "check_tokenizer_files", "check_weights",
    "get_adapter", "held_model", "hub_endpoint", "hub_offline", "hub_reachable", "load_model",
    "load_tokenizer",
    "model_shape", "resolve_device", "resolve_dtype", "resolve_source", "tensor_hash",
    "weights_fingerprint", "wrap_model",
]

def _from_pretrained(source: str, config: ModelConfig, dtype: torch.dtype, device: str):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, **check_source(source, config),
                              # shape mismatches come back in the loading info, refused below
                              "output_loading_info": True, "ignore_mismatched_sizes": True}
    if config.device_map:
        kwargs["device_map"] = config.device_map
    try:
        with quiet_load_report():
            model, info = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except SafetensorError as err:
        raise ModelConfigError(f"model {source!r}: a weights file is truncated or corrupt "
                               f"({one_line(err)[:200]}); accepted: complete safetensors files "
                               "(re-download or re-save the model)") from err
    except OSError as err:  # no safetensors weights, or not in the cache when offline
        raise ModelConfigError(f"model {source!r}: weights cannot be loaded ({one_line(err)[:300]}); "
                               "accepted: a folder or cached hub id with safetensors weights") from err
    except RuntimeError as err:  # transformers' own refusal: state-dict or conversion errors
        if "loading state_dict" not in str(err) and "conversion" not in str(err):
            raise
        raise ModelConfigError(f"model {source!r}: its weights do not fit its config "
                               f"({one_line(err)[:300]}); {_FIT}") from err
    check_loading_info(source, info)
    if not config.device_map:
        model = model.to(device)
    return model


_FIT = ("accepted: weights files holding exactly the tensors its config.json describes, tied "
        "weights aside (fix config.json, or re-save the model)")


def check_loading_info(source: str, info: Mapping[str, Any]) -> None:
    """One error line naming the weights (first few, and how many) that ``from_pretrained`` left
    random, dropped, or found in another shape: the model would not be the checkpoint."""
    problem = weight_mismatch(info)
    if problem:
        raise ModelConfigError(f"model {source!r} does not match its config: {problem}; {_FIT}")


def _left_padded(tokenizer: Any) -> Any:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "*.tiktoken")


def _tokenizer_folder(source: str, config: ModelConfig, kwargs: Mapping[str, Any]) -> Path | None:
    """The folder the tokenizer is read from when nothing is downloaded: a local folder, or the
    cached snapshot of a hub id loaded with ``local_files_only``; None when the hub is asked."""
    local = local_dir(source)
    if local is not None or not kwargs.get("local_files_only"):
        return local
    cached = cached_config(source, config.revision)
    return Path(cached).parent if cached else None


def _custom_tokenizer(folder: Path) -> bool:
    """Whether tokenizer_config.json maps AutoTokenizer to remote code (its own file names)."""
    path = folder / "tokenizer_config.json"
    try:
        return entry_kind(path) == REGULAR and "AutoTokenizer" in (
            json.loads(path.read_text()).get("auto_map") or {})
    except (OSError, ValueError, AttributeError):
        return False


def check_tokenizer_files(source: str, cfg: ModelConfig) -> None:
    """One error line when the folder ``source`` loads from holds no tokenizer files (checked on
    names alone, before anything is read); a hub id fetched from the hub is not checked."""
    config = cfg
    folder = _tokenizer_folder(source, config, check_source(source, config))
    if folder is None or any(entry_kind(p) == REGULAR for name in TOKENIZER_FILES
                             for p in folder.glob(name)):
        return
    if config.trust_remote_code and _custom_tokenizer(folder):
        return
    raise ModelConfigError(
        f"model {source!r} has no tokenizer in {str(folder)!r} (looked for "
        f"{', '.join(TOKENIZER_FILES)}); accepted: a model folder holding its tokenizer files "
        "(save the tokenizer it was trained with there: tokenizer.save_pretrained(folder))")


def load_tokenizer(source: str, cfg: ModelConfig) -> Any:
    """The model's tokenizer with left padding and a pad token."""
    from transformers import AutoTokenizer

    config = cfg
    check_tokenizer_files(source, config)
    kwargs = check_source(source, config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as err:  # missing or unreadable files
        raise ModelConfigError(f"model {source!r}: its tokenizer cannot be loaded "
                               f"({one_line(err)[:300]}); accepted: a folder or cached hub id "
                               "with tokenizer files") from err
    return _left_padded(tokenizer)


_LOADED: dict[str, LoadedModel] = {}


def _source_stamp(source: str, config: ModelConfig) -> list[Any]:
    """What identifies the files behind ``source`` now: sizes and mtimes of a local folder's
    config and weights, or the cached snapshot a hub id resolves to."""
    local = local_dir(source)
    if local is not None:
        files = sorted(p for p in local.iterdir() if p.is_file() and (
            p.name == "config.json" or p.suffix == ".safetensors" or p.name.endswith(".index.json")))
        return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    try:
        return [cached_config(source, config.revision)]
    except ValueError:
        return [None]


def _reuse_key(config: ModelConfig, cache_dir: str | Path | None) -> str:
    """The in-process reuse key: what would be loaded (resolved source and its files, resolved
    device and dtype, revision), never the config name alone."""
    device = check_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    source = resolve_source(config, cache_dir)
    return json.dumps({"name": config.name, "revision": config.revision,
                       "device_map": config.device_map, "trust_remote_code": config.trust_remote_code,
                       "source": source, "device": device, "dtype": str(dtype),
                       "files": _source_stamp(source, config)}, sort_keys=True, default=str)


def held_model(cfg: ModelConfig, cache_dir: str | Path | None = None) -> LoadedModel | None:
    """The model :func:`load_model` would hand back without loading (same resolved source and
    files, device, dtype, revision), or None: a job of a sweep takes its tokenizer from it
    instead of reading the tokenizer files again."""
    return _LOADED.get(_reuse_key(cfg, cache_dir))


def load_model(cfg: ModelConfig, cache_dir: str | Path | None = None,
               tokenizer: Any = None, reuse: bool = True) -> LoadedModel:
    """Load the model named by a model config (see ``conf/model``), in eval mode, frozen.

    With ``reuse`` the last model loaded in this process is handed back when the same thing would
    be loaded (same resolved source and files, device, dtype, revision): a multirun over eta runs
    its jobs in one process and must not reload the model.
    """
    config = cfg
    key = _reuse_key(config, cache_dir)  # checks the device before anything loads
    if reuse and key in _LOADED:
        return _LOADED[key]
    _LOADED.clear()  # hold at most one model: a sweep over models must not keep them all
    loaded = _load_model(config, cache_dir, tokenizer)
    if reuse:
        _LOADED[key] = loaded
    return loaded


def _load_model(config: ModelConfig, cache_dir: str | Path | None, tokenizer: Any) -> LoadedModel:
    device = check_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    source = resolve_source(config, cache_dir)
    # everything that can be checked without reading the weights, before they are read
    check_architecture(source, config)
    check_weights(source, config)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source, config)
    model = _from_pretrained(source, config, dtype, device)
    model.eval()
    model.requires_grad_(False)
    adapter = get_adapter(model)
    commit = getattr(model.config, "_commit_hash", None)
    return LoadedModel(str(config.name), source, model, tokenizer, adapter,
                       tensor_hash(adapter.unembed_weight), revision=config.revision,
                       commit=None if commit is None else str(commit))


def wrap_model(model: nn.Module, tokenizer: Any, name: str = "custom",
               source: str | None = None) -> LoadedModel:
    """Wrap an already-built model (e.g. a tiny random one in tests) as a :class:`LoadedModel`;
    ``source`` defaults to ``name``."""
    model.eval()
    model.requires_grad_(False)
    if tokenizer is not None:
        _left_padded(tokenizer)
    adapter = get_adapter(model)
    return LoadedModel(name, source or name, model, tokenizer, adapter,
                       tensor_hash(adapter.unembed_weight))
