"""Reuse of unsteered probe results: in-process and on disk.

A sweep over eta (or over direction settings) for one model and dataset must not redo the
unsteered probe in every job. Results are keyed by a fingerprint of the model weights, the exact
prompts, option tokens and labels, and the probe outputs asked for; any change gives a new key.
Entries are ``.npz`` files read with ``allow_pickle=False``; an entry whose stored key or
checksum does not match (corrupted, truncated) is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calibrate import results
from calibrate.assets import cache_root
from calibrate.continuations import requests_digest
from calibrate.probe import ProbeResult, ProbeSettings
from calibrate.prompts import PromptSet

CACHE_VERSION = 1
_SAMPLE_BYTES = 1 << 16
_MEMORY: dict[str, ProbeResult] = {}


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and its first and last 64 KiB of bytes.

    Cheap for a 7B model (no full pass over the weights) and changes with any fine-tune,
    re-quantization or different checkpoint in practice.
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


def _array_hash(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def probe_key(fingerprint: str, prompt_set: PromptSet, settings: ProbeSettings) -> str:
    """The cache key of a probe run."""
    payload = {
        "version": CACHE_VERSION, "weights": fingerprint,
        "prompts": hashlib.sha256("\x00".join(prompt_set.prompts).encode()).hexdigest(),
        "option_ids": _array_hash(prompt_set.option_ids), "labels": _array_hash(prompt_set.labels),
        "option_mass": settings.option_mass, "keep_layers": sorted(settings.keep_layers),
    }
    if prompt_set.is_cloze:  # the continuations and their normalization decide the scores
        payload.update(cloze=requests_digest(prompt_set.requests), cloze_norm=prompt_set.cloze_norm)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _path(key: str, cache_dir: str | Path | None) -> Path:
    return cache_root(cache_dir) / "probe" / f"{key}.npz"


def _arrays(result: ProbeResult) -> dict[str, np.ndarray]:
    arrays = {"option_logits": result.option_logits, "labels": result.labels,
              "tokens": np.array([result.real_tokens, result.computed_tokens])}
    if result.option_mass is not None:
        arrays["option_mass"] = result.option_mass
    for layer, values in result.residuals.items():
        arrays[f"residual_{layer}"] = values
    return arrays


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def store(key: str, result: ProbeResult, cache_dir: str | Path | None) -> None:
    """Keep a result in memory and on disk (atomically)."""
    _MEMORY.clear()  # one entry in memory: a sweep over models must not hold them all
    _MEMORY[key] = result
    arrays = _arrays(result)
    meta = np.frombuffer(json.dumps({"key": key, "checksum": _checksum(arrays)}).encode(), np.uint8)
    results.write_npz(_path(key, cache_dir), meta=meta, **arrays)


def load(key: str, cache_dir: str | Path | None) -> ProbeResult | None:
    """A stored result, or None when absent or damaged."""
    if key in _MEMORY:
        return _MEMORY[key]
    path = _path(key, cache_dir)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
        if meta.get("key") != key or meta.get("checksum") != _checksum(arrays):
            return None
    except (OSError, ValueError, KeyError, json.JSONDecodeError,
            EOFError, zipfile.BadZipFile, zlib.error):  # truncated or flipped bytes
        return None
    from calibrate.lens import option_probabilities

    real, computed = (int(x) for x in arrays["tokens"])
    residuals = {int(n.split("_", 1)[1]): v for n, v in arrays.items() if n.startswith("residual_")}
    result = ProbeResult(arrays["option_logits"], option_probabilities(arrays["option_logits"]),
                         arrays["labels"], arrays.get("option_mass"), residuals, real, computed)
    _MEMORY.clear()
    _MEMORY[key] = result
    return result
