"""Reuse of unsteered probe results: in-process and on disk.

A sweep over eta (or over direction settings) for one model and dataset must not redo the
unsteered probe in every job. Results are keyed by a fingerprint of the model weights, the exact
prompts, option tokens and labels, and the probe outputs asked for; any change gives a new key.
Entries are ``.npz`` files read with ``allow_pickle=False``; an entry whose stored key or
checksum does not match (corrupted, truncated) is ignored and rebuilt. A cache that cannot be
written is reported once and never fails the job.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from pathlib import Path

import numpy as np

from calibrate.engine.probe import ProbeResult, ProbeSettings
from calibrate.engine.scoring import scoring_of
from calibrate.io import results
from calibrate.model.assets import cache_root
from calibrate.model.identity import weights_fingerprint  # noqa: F401 - the cache's key of the weights
from calibrate.tasks.prompts import PromptSet

CACHE_VERSION = 1
_MEMORY: dict[str, ProbeResult] = {}


def _array_hash(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def probe_key(fingerprint: str, prompt_set: PromptSet, settings: ProbeSettings,
              readout: str = "logit") -> str:
    """The cache key of a probe run: the weights, the exact prompts, option tokens and labels,
    the outputs asked for and the readout's identity (:attr:`Readout.identity`)."""
    payload = {"readout": readout,
        "version": CACHE_VERSION, "weights": fingerprint,
        "prompts": hashlib.sha256("\x00".join(prompt_set.prompts).encode()).hexdigest(),
        "option_ids": _array_hash(prompt_set.option_ids), "labels": _array_hash(prompt_set.labels),
        "option_mass": settings.option_mass, "keep_layers": sorted(settings.keep_layers),
    }
    payload.update(scoring_of(prompt_set).key_fields(prompt_set))  # e.g. cloze continuations
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
    """Keep a result in memory and on disk (atomically).

    A cache folder that cannot be written (permission denied, read-only, disk full, quota) is
    logged once per process on the ``calibrate`` logger and skipped; the in-memory entry stays.
    """
    _MEMORY.clear()  # one entry in memory: a sweep over models must not hold them all
    _MEMORY[key] = result
    arrays = _arrays(result)
    meta = np.frombuffer(json.dumps({"key": key, "checksum": _checksum(arrays)}).encode(), np.uint8)
    path = _path(key, cache_dir)
    try:
        results.write_npz(path, meta=meta, **arrays)
    except (OSError, results.OutputError) as err:
        if not results.cache_unwritable(err):
            raise
        results.warn_cache_unwritable(path.parent, err)


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
    from calibrate.core.option_scores import option_probabilities

    real, computed = (int(x) for x in arrays["tokens"])
    residuals = {int(n.split("_", 1)[1]): v for n, v in arrays.items() if n.startswith("residual_")}
    result = ProbeResult(arrays["option_logits"], option_probabilities(arrays["option_logits"]),
                         arrays["labels"], arrays.get("option_mass"), residuals, real, computed)
    _MEMORY.clear()
    _MEMORY[key] = result
    return result
