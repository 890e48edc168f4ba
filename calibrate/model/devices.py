"""Where the model runs and in which dtype: ``model.device`` and ``model.dtype`` resolved and
checked against this machine before anything loads."""

from __future__ import annotations

import torch

from calibrate.model.config import DTYPES, ModelConfigError, one_line

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` is bfloat16 on GPU and float32 on CPU; otherwise the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in TORCH_DTYPES:
        raise ModelConfigError(f"model.dtype={name!r}; accepted: auto, {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


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
        raise ModelConfigError(f"model.device={name!r} is not a device name ({one_line(err)[:80]}); "
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
