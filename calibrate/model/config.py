"""The typed model config: the ``model`` group (``conf/model/*.yaml``), checked where it is built.

:class:`ModelConfig` is the schema Hydra composes ``conf/model/<name>.yaml`` into (unknown keys
and wrong types are refused there) and checks its own values in ``__post_init__``; every function
past the entry points takes the dataclass and never indexes a dict. The accepted dtypes and
device names are defined here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from calibrate import values
from calibrate.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")  # besides "auto": bfloat16 on GPU, float32 on CPU
DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")  # and cuda:N
DEVICES_HINT = "auto, cpu, cuda, cuda:N"


class ModelConfigError(UserError):
    """A model config value is invalid."""


def one_line(err: BaseException) -> str:
    """An error's message folded onto one line (its type's name when it has none)."""
    text = str(err).strip()
    return " ".join(text.split()) if text else type(err).__name__


@dataclass
class ModelConfig:
    """What to load and how: the ``model`` group, typed and checked."""

    name: str | None = None  # a plain name (it names cache folders and runs)
    path: str | None = None  # a local folder or a hub id; None: the offline copy
    offline: dict[str, Any] | None = None  # the packaged copy (see calibrate.model.assets)
    revision: str | None = None  # None: the default branch
    dtype: str = "auto"  # auto or one of DTYPES
    device: str = "auto"  # availability is checked when the model loads (check_device)
    device_map: Any = None  # e.g. "auto" to spread a large model over several GPUs
    trust_remote_code: bool = False
    direction_layers: Any = "auto"  # default layers of the calibration direction (our numbering)

    def __post_init__(self) -> None:
        err = ModelConfigError
        if self.name is not None:
            values.path_name("model.name", self.name, err)
        values.optional_text("model.path", self.path, err)
        values.optional_text("model.revision", self.revision, err)
        values.choice("model.dtype", self.dtype, ("auto", *DTYPES), err)
        device = values.text("model.device", self.device, err)
        if not (device in DEVICE_NAMES or device.startswith("cuda:")):
            raise err(f"model.device={device!r}; accepted: {DEVICES_HINT}")
        if self.device_map is not None and not isinstance(self.device_map, (str, dict)):
            raise err(f"model.device_map={self.device_map!r}; accepted: null, auto, or a "
                      "mapping of module names to devices")
        values.flag("model.trust_remote_code", self.trust_remote_code, err)
        if self.direction_layers is not None:
            self.direction_layers = values.layer_list("model.direction_layers",
                                                      self.direction_layers, ("auto",), err)
        if not self.path and not self.offline:
            raise err(f"model {self.name!r} has no model.path and no offline copy; "
                      "set model.path to a hub id or a local folder")
        if self.offline and not self.path:
            from calibrate.model.assets import check_offline

            check_offline(self.name, self.offline, err)
