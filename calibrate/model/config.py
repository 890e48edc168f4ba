"""The typed model config: the ``model`` group (``conf/model/*.yaml``) read once, at the entry points.

:meth:`ModelConfig.from_mapping` turns a raw mapping into a frozen :class:`ModelConfig`; every
function past the entry points takes the dataclass and never indexes a dict. The accepted dtypes
and device names are defined here (``calibrate.config.validate`` imports them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")  # besides "auto": bfloat16 on GPU, float32 on CPU
DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")  # and cuda:N
DEVICES_HINT = "auto, cpu, cuda, cuda:N"


class ModelConfigError(ValueError):
    """A model config value is invalid."""


def one_line(err: BaseException) -> str:
    """An error's message folded onto one line (its type's name when it has none)."""
    text = str(err).strip()
    return " ".join(text.split()) if text else type(err).__name__


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how: one model config, typed.

    Keys of the mapping that are not the loader's (``direction_layers``, ...) are not kept.
    """

    name: str | None = None
    path: str | None = None  # a local folder or a hub id; None: the offline copy
    offline: Mapping[str, Any] | None = None  # the packaged copy (see calibrate.model.assets)
    revision: str | None = None  # None: the default branch
    dtype: str = "auto"  # auto or one of DTYPES
    device: str = "auto"  # availability is checked when the model loads (check_device)
    device_map: Any = None  # e.g. "auto" to spread a large model over several GPUs
    trust_remote_code: bool = False

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any],
                     error: type[Exception] = ModelConfigError) -> ModelConfig:
        """A mapping of ``model.*`` keys as a :class:`ModelConfig`; a bad dtype is one ``error``
        line (the message of ``calibrate.config.validate.check_model``)."""
        if not isinstance(cfg, Mapping):
            raise error(f"model config is a {type(cfg).__name__}; accepted: a mapping of model keys")
        dtype = cfg.get("dtype", "auto")
        if dtype not in ("auto", *DTYPES):
            raise error(f"model.dtype={dtype!r}; accepted: auto, {', '.join(DTYPES)}")
        name, path, revision = cfg.get("name"), cfg.get("path"), cfg.get("revision")
        return cls(name=None if name is None else str(name), path=str(path) if path else None,
                   offline=cfg.get("offline") or None,
                   revision=None if revision is None else str(revision), dtype=str(dtype),
                   device=str(cfg.get("device", "auto")), device_map=cfg.get("device_map") or None,
                   trust_remote_code=bool(cfg.get("trust_remote_code")))

    @classmethod
    def of(cls, cfg: ModelConfig | Mapping[str, Any]) -> ModelConfig:
        """``cfg`` itself when it is a :class:`ModelConfig`, else :meth:`from_mapping` of it."""
        return cfg if isinstance(cfg, ModelConfig) else cls.from_mapping(cfg)

    def check(self, error: type[Exception] = ModelConfigError) -> ModelConfig:
        """The remaining checks of a job's model config, before anything loads: the device is
        a device name, the model has a source, and the names that become cache paths (the
        model's name, its offline copy's parts) are plain names. Returns ``self``."""
        from calibrate.io.paths import check_path_name

        if not (self.device in DEVICE_NAMES or self.device.startswith("cuda:")):
            raise error(f"model.device={self.device!r}; accepted: {DEVICES_HINT}")
        if self.name is not None:
            check_path_name("model.name", self.name, error)
        if not self.path and not self.offline:
            raise error(f"model {self.name!r} has no model.path and no offline copy; "
                        "set model.path to a hub id or a local folder")
        if self.offline and not self.path:
            from calibrate.model.assets import check_offline

            check_offline(self.name, self.offline, error)
        return self


ModelConfigLike = ModelConfig | Mapping[str, Any]  # what the entry points accept
