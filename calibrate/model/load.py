"""Load a model and its tokenizer by config: offline packaged copy, local folder or hub id.

Everything that can be checked without the weights is checked first, each failure one
:class:`ModelConfigError` line: the device (:func:`check_device`), where the model comes from (a
local folder, a hub id in the local Hugging Face cache, or a reachable hub: :func:`check_source`),
its architecture and shape (:func:`check_architecture`, :func:`model_shape`) and the integrity of
its safetensors files (:func:`check_weights`). A loaded model carries its real identity
(:meth:`LoadedModel.identity`): the source, revision, parameter dtype, device, ``model_type`` and a
fingerprint of the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import struct
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibrate.model.adapters import Adapter, check_supported, get_adapter
from calibrate.model.assets import prepare_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAMPLE_BYTES = 1 << 16
HUB_PROBE_TIMEOUT_S = 3.0
_HUB_VERDICT: dict[str, bool] = {}  # endpoint -> reachable, probed once per process
_TRUE = {"1", "on", "yes", "true"}


class ModelConfigError(ValueError):
    """A model config value is invalid."""


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return " ".join(text.split()) if text else type(err).__name__


# ---------------------------------------------------------------- identity

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


# ---------------------------------------------------------------- dtype and device

def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` is bfloat16 on GPU and float32 on CPU; otherwise the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in _DTYPES:
        raise ModelConfigError(f"model.dtype={name!r}; accepted: auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def resolve_device(name: str) -> str:
    """``auto`` is cuda when available, else cpu (no availability check: see :func:`check_device`)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The ``model.device`` values that work on this machine."""
    count = _cuda_count()
    cuda = (["cuda"] + [f"cuda:{i}" for i in range(count)]) if count else []
    return ["auto", "cpu", *cuda, *(["mps"] if _mps_available() else [])]


def check_device(name: str) -> str:
    """The device ``model.device`` names, resolved (``auto``), or one error line if it is absent."""
    name = str(name)
    if name == "auto":
        return resolve_device(name)
    accepted = ", ".join(available_devices())
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ModelConfigError(f"model.device={name!r} is not a device name ({_one_line(err)[:80]}); "
                               f"accepted here: {accepted}") from err
    if device.type == "cpu":
        return name
    if device.type == "cuda":
        count = _cuda_count()
        if count and (device.index is None or device.index < count):
            return name
        why = (f"torch sees {count} CUDA device(s)" if count else
               "this torch is a CPU-only build" if torch.version.cuda is None else
               "torch sees no CUDA device")
        raise ModelConfigError(f"model.device={name!r} is not available ({why}); accepted here: {accepted}")
    if device.type == "mps":
        if _mps_available():
            return name
        raise ModelConfigError(f"model.device={name!r} is not available (no Apple MPS backend); "
                               f"accepted here: {accepted}")
    raise ModelConfigError(f"model.device={name!r} is not supported; accepted here: {accepted}")


# ---------------------------------------------------------------- where the model comes from

def _local_dir(source: str) -> Path | None:
    path = Path(source).expanduser()
    return path if path.is_dir() else None


def resolve_source(cfg: Mapping[str, Any], cache_dir: str | Path | None = None) -> str:
    """The folder (absolute) or hub id to load: ``path`` if set, else the prepared offline copy."""
    if cfg.get("path"):
        source = str(cfg["path"])
    elif cfg.get("offline"):
        source = str(prepare_model(cfg["name"], cfg["offline"], cache_dir))
    else:
        raise ModelConfigError(f"model {cfg.get('name')!r} has neither model.path nor an offline copy")
    local = _local_dir(source)
    return os.path.abspath(local) if local is not None else source


def hub_endpoint() -> str:
    """The Hugging Face endpoint (``HF_ENDPOINT``, read now)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, read now."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _probe_hub(endpoint: str, timeout: float) -> bool:
    """One HEAD request to ``endpoint``: any HTTP answer is reachable. Bounded by ``timeout`` even
    when name resolution hangs (it runs in a daemon thread)."""
    answer: list[bool] = []

    def attempt() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
            answer.append(True)
        except urllib.error.HTTPError:  # the server answered
            answer.append(True)
        except urllib.error.URLError as err:  # a TLS failure still means something answered
            answer.append(isinstance(err.reason, ssl.SSLError))
        except Exception:  # noqa: BLE001 - DNS, refused, timeout: unreachable
            answer.append(False)

    thread = threading.Thread(target=attempt, name="calibrate-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answer and answer[0])


def hub_reachable() -> bool:
    """Whether the hub endpoint answers; probed once per process and endpoint."""
    endpoint = hub_endpoint()
    if endpoint not in _HUB_VERDICT:
        _HUB_VERDICT[endpoint] = _probe_hub(endpoint, HUB_PROBE_TIMEOUT_S)
    return _HUB_VERDICT[endpoint]


def _looks_like_path(source: str) -> bool:
    return (source.startswith(("/", "./", "../", "~", ".\\")) or "\\" in source
            or source.count("/") > 1 or Path(source).exists())


def _cached_config(source: str, revision: str | None) -> str | None:
    """The cached config.json of hub id ``source``, or None (raises on an invalid hub id)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json", revision=revision)
    return cached if isinstance(cached, str) else None


def check_source(source: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Where ``source`` loads from, as keyword arguments for transformers' ``from_pretrained``.

    A local folder loads as is; a hub id in the local Hugging Face cache loads from there
    (``local_files_only`` when offline or the hub is unreachable); an uncached hub id needs the
    hub, probed once per process (never when ``HF_HUB_OFFLINE`` is set). Otherwise one error line.
    """
    revision = cfg.get("revision")
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": bool(cfg.get("trust_remote_code"))}
    if _local_dir(source) is not None:
        return kwargs
    if _looks_like_path(source):
        what = "a file, not a folder" if Path(source).expanduser().exists() else "no such folder"
        raise ModelConfigError(f"model {source!r} cannot be loaded ({what}); accepted: a local "
                               "model folder, or a hub id that is cached or reachable")
    try:
        cached = _cached_config(source, revision)
    except ValueError as err:  # HFValidationError: not a hub id either
        raise ModelConfigError(f"model {source!r} cannot be loaded (neither a folder nor a valid hub "
                               "id); accepted: a local model folder, or a hub id owner/name") from err
    if cached is not None:
        if hub_offline() or not hub_reachable():
            kwargs["local_files_only"] = True
        return kwargs
    if hub_offline():
        why = "HF_HUB_OFFLINE is set"
    elif not hub_reachable():
        why = (f"the hub ({hub_endpoint()}) is unreachable (one probe, {HUB_PROBE_TIMEOUT_S:g} s "
               "timeout)")
    else:
        return kwargs
    from huggingface_hub import constants

    at = f"@{revision}" if revision else ""
    raise ModelConfigError(
        f"model {source!r}{at} is neither a local folder nor in the local Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and {why}; accepted: model.path=<a local model folder>, or "
        f"download it on a machine with network (`hf download {source}` into the HF cache, "
        "HF_HOME/HF_HUB_CACHE) and run with HF_HUB_OFFLINE=1")


def _read_config(source: str, cfg: Mapping[str, Any]) -> Any:
    from transformers import AutoConfig

    kwargs = check_source(source, cfg)
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except Exception as err:  # a missing, broken or invalid config, an unknown hub id
        raise ModelConfigError(f"model {source!r} cannot be loaded ({_one_line(err)[:300]}); accepted: "
                               "a local model folder, or a hub id that is cached or reachable") from err


def check_architecture(source: str, cfg: Mapping[str, Any]) -> str:
    """The ``model_type`` of ``source`` read from its config alone; an error if it has no adapter."""
    model_type = _read_config(source, cfg).model_type
    check_supported(model_type)
    return model_type


@dataclass(frozen=True)
class ModelShape:
    """A model's sizes read from its config alone (before any weights)."""

    model_type: str
    num_blocks: int  # L: the lens reads layers 0..L
    hidden_size: int
    context_length: int | None  # the longest input in tokens, None when the config has none
    vocab_size: int


_SHAPE_KEYS = {
    "num_blocks": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "vocab_size": ("vocab_size", "n_vocab", "padded_vocab_size"),
    "context_length": ("max_position_embeddings", "n_positions", "max_sequence_length",
                       "seq_length", "n_ctx", "max_seq_len"),
}


def model_shape(source: str, cfg: Mapping[str, Any], check: bool = True) -> ModelShape:
    """The number of blocks, hidden size, context length and vocabulary of ``source`` from its
    config (the text model's where the config nests a ``text_config``); no weights are read.

    With ``check`` (the default) an architecture without an adapter is an error too, as in
    :func:`check_architecture`, so this one call is the whole pre-weights model check.
    """
    hf_config = _read_config(source, cfg)
    if check:
        check_supported(hf_config.model_type)
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    values: dict[str, int | None] = {}
    for what, keys in _SHAPE_KEYS.items():
        found = next((v for k in keys for v in (getattr(text, k, None),)
                      if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)
        if found is None and what != "context_length":
            raise ModelConfigError(f"model {source!r}: its config has no {what} (looked for "
                                   f"{', '.join(keys)}); accepted: a transformers causal-LM config")
        values[what] = found
    return ModelShape(str(hf_config.model_type), **values)  # type: ignore[arg-type]


# ---------------------------------------------------------------- weight files

_MAX_HEADER = 100_000_000  # safetensors' own limit


def _check_safetensors(path: Path) -> None:
    """One error line if ``path`` is not a complete safetensors file (header and data sizes)."""
    size = path.stat().st_size
    accepted = "accepted: a complete safetensors file (re-download or re-save the model)"
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise ModelConfigError(f"weights file {str(path)!r} is truncated ({size} bytes); {accepted}")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER:
            raise ModelConfigError(f"weights file {str(path)!r} is corrupt (header length {header_len} "
                                   f"bytes, not safetensors); {accepted}")
        if 8 + header_len > size:
            raise ModelConfigError(f"weights file {str(path)!r} is truncated or corrupt ({size} bytes, "
                                   f"its header alone needs {8 + header_len}); {accepted}")
        try:
            header = json.loads(fh.read(header_len))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise ModelConfigError(f"weights file {str(path)!r} is corrupt (unreadable safetensors "
                                   f"header: {_one_line(err)[:80]}); {accepted}") from err
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise ModelConfigError(f"weights file {str(path)!r} is truncated ({size} of {expected} bytes); "
                               f"{accepted}")
    if size > expected:
        raise ModelConfigError(f"weights file {str(path)!r} is corrupt ({size} bytes, its header "
                               f"describes {expected}); {accepted}")


def _weights_folder(source: str, cfg: Mapping[str, Any]) -> tuple[Path | None, bool]:
    """The folder holding the weights files now (local, or the cached hub snapshot), and whether
    every file must be there already (a local folder)."""
    local = _local_dir(source)
    if local is not None:
        return local, True
    try:
        cached = _cached_config(source, cfg.get("revision"))
    except ValueError:
        return None, False
    return (Path(cached).parent, False) if cached else (None, False)


def check_weights(source: str, cfg: Mapping[str, Any]) -> None:
    """One error line naming the file if a safetensors file of ``source`` is truncated, corrupt or
    (local folders) missing from its index; reads only the headers."""
    folder, complete = _weights_folder(source, cfg)
    if folder is None:
        return
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelConfigError(f"weights index {str(index)!r} is corrupt ({_one_line(err)[:80]}); "
                                   "accepted: a safetensors index with a weight_map") from err
    else:
        names = ["model.safetensors"]
    for name in names:
        path = folder / name
        if path.is_file():
            _check_safetensors(path)
        elif complete and index.is_file():
            raise ModelConfigError(f"weights file {str(path)!r} named in {index.name} is missing; "
                                   "accepted: a folder with every shard its index names")


# ---------------------------------------------------------------- loading

def tensor_hash(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype)."""
    data = tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def _from_pretrained(source: str, cfg: Mapping[str, Any], dtype: torch.dtype, device: str):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    check_architecture(source, cfg)  # before the weights are read
    check_weights(source, cfg)
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, **check_source(source, cfg)}
    if cfg.get("device_map"):
        kwargs["device_map"] = cfg["device_map"]
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except SafetensorError as err:
        raise ModelConfigError(f"model {source!r}: a weights file is truncated or corrupt "
                               f"({_one_line(err)[:200]}); accepted: complete safetensors files "
                               "(re-download or re-save the model)") from err
    except OSError as err:  # no safetensors weights, or not in the cache when offline
        raise ModelConfigError(f"model {source!r}: weights cannot be loaded ({_one_line(err)[:300]}); "
                               "accepted: a folder or cached hub id with safetensors weights") from err
    if not cfg.get("device_map"):
        model = model.to(device)
    return model


def load_tokenizer(source: str, cfg: Mapping[str, Any]) -> Any:
    """The model's tokenizer with left padding and a pad token."""
    from transformers import AutoTokenizer

    kwargs = check_source(source, cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as err:
        raise ModelConfigError(f"model {source!r}: its tokenizer cannot be loaded "
                               f"({_one_line(err)[:300]}); accepted: a folder or cached hub id "
                               "with tokenizer files") from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_LOADED: dict[str, LoadedModel] = {}


def _source_stamp(source: str, cfg: Mapping[str, Any]) -> list[Any]:
    """What identifies the files behind ``source`` now: sizes and mtimes of a local folder's
    config and weights, or the cached snapshot a hub id resolves to."""
    local = _local_dir(source)
    if local is not None:
        files = sorted(p for p in local.iterdir() if p.is_file() and (
            p.name == "config.json" or p.suffix == ".safetensors" or p.name.endswith(".index.json")))
        return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    try:
        return [_cached_config(source, cfg.get("revision"))]
    except ValueError:
        return [None]


def _reuse_key(cfg: Mapping[str, Any], cache_dir: str | Path | None) -> str:
    """The in-process reuse key: what would be loaded (resolved source and its files, resolved
    device and dtype, revision), never the config name alone."""
    device = check_device(str(cfg.get("device", "auto")))
    dtype = resolve_dtype(str(cfg.get("dtype", "auto")), device)
    source = resolve_source(cfg, cache_dir)
    keys = ("name", "revision", "device_map", "trust_remote_code")
    return json.dumps({**{k: cfg.get(k) for k in keys}, "source": source, "device": device,
                       "dtype": str(dtype), "files": _source_stamp(source, cfg)},
                      sort_keys=True, default=str)


def load_model(cfg: Mapping[str, Any], cache_dir: str | Path | None = None,
               tokenizer: Any = None, reuse: bool = True) -> LoadedModel:
    """Load the model named by a model config (see ``conf/model``), in eval mode, frozen.

    With ``reuse`` the last model loaded in this process is handed back when the same thing would
    be loaded (same resolved source and files, device, dtype, revision): a multirun over eta runs
    its jobs in one process and must not reload the model.
    """
    key = _reuse_key(cfg, cache_dir)  # checks the device before anything loads
    if reuse and key in _LOADED:
        return _LOADED[key]
    _LOADED.clear()  # hold at most one model: a sweep over models must not keep them all
    loaded = _load_model(cfg, cache_dir, tokenizer)
    if reuse:
        _LOADED[key] = loaded
    return loaded


def _load_model(cfg: Mapping[str, Any], cache_dir: str | Path | None, tokenizer: Any) -> LoadedModel:
    device = check_device(str(cfg.get("device", "auto")))
    dtype = resolve_dtype(str(cfg.get("dtype", "auto")), device)
    source = resolve_source(cfg, cache_dir)
    model = _from_pretrained(source, cfg, dtype, device)
    model.eval()
    model.requires_grad_(False)
    adapter = get_adapter(model)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source, cfg)
    revision = cfg.get("revision")
    commit = getattr(model.config, "_commit_hash", None)
    return LoadedModel(str(cfg["name"]), source, model, tokenizer, adapter,
                       tensor_hash(adapter.unembed_weight),
                       revision=None if revision is None else str(revision),
                       commit=None if commit is None else str(commit))


def wrap_model(model: nn.Module, tokenizer: Any, name: str = "custom",
               source: str | None = None) -> LoadedModel:
    """Wrap an already-built model (e.g. a tiny random one in tests) as a :class:`LoadedModel`;
    ``source`` defaults to ``name``."""
    model.eval()
    model.requires_grad_(False)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    adapter = get_adapter(model)
    return LoadedModel(name, source or name, model, tokenizer, adapter,
                       tensor_hash(adapter.unembed_weight))
