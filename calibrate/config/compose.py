"""The one place the config tree is read: compose a command line, type it, check every key.

:func:`compose` is Hydra's composition of ``calibrate/conf/config.yaml`` with overrides, exactly
as ``python -m calibrate.run`` composes it (the CLI's Hydra app and this function see the same
tree and the same implied overrides); :func:`typed` turns the composed tree into the typed root
(:class:`calibrate.config.schema.Config`), refusing any key no schema has — also one added with
``+key=value`` — and running every group's own checks.

"``eta`` alone means steering" is decided here, by composition: a command line that sets
``eta`` but chooses no study (no ``intervention=`` and no ``experiment=``) composes
``intervention=steering``, so the steering study's settings (``intervention.layers`` ...) can be
set on the same line and the recorded config names the study that ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from calibrate import values
from calibrate.config import CONF_DIR, schema
from calibrate.errors import ConfigError

STEERING = "steering"  # the study that an eta alone implies


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def implied_overrides(overrides: Sequence[str]) -> list[str]:
    """``overrides`` plus ``intervention=steering`` when they set ``eta`` and choose no study."""
    keys = {_key(o) for o in overrides if "=" in o}
    if "eta" in keys and not keys & {"intervention", "experiment"}:
        return [f"intervention={STEERING}", *overrides]
    return list(overrides)


def _check_plugins() -> None:
    if "intervention" not in ConfigStore.instance().repo:
        raise RuntimeError("no study is registered: import calibrate.studies before composing")


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The job config exactly as the CLI composes it (``conf/config.yaml`` + overrides)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    _check_plugins()
    schema.register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=implied_overrides(overrides))


def unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys of ``node`` (and below) that the schema of their group does not have."""
    if not isinstance(node, DictConfig):
        return []
    found = []
    kind = OmegaConf.get_type(node)
    if kind is not None and dataclasses.is_dataclass(kind):
        known = {f.name for f in dataclasses.fields(kind)}
        found += [f"{prefix}{k}" for k in node.keys()
                  if k not in known and not (k == "hydra" and not prefix)]  # Hydra's own node
    for key in node.keys():
        if key == "hydra" and not prefix:
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            found += unknown_keys(child, f"{prefix}{key}.")
    return found


def typed(cfg: DictConfig) -> schema.Config:
    """The composed config as the typed root; every group checks its own values."""
    bad = unknown_keys(cfg)
    if bad:
        first = bad[0]
        group, _, _ = first.rpartition(".")
        node = OmegaConf.select(cfg, group) if group else cfg
        kind = OmegaConf.get_type(node)
        accepted = ", ".join(f.name for f in dataclasses.fields(kind))
        raise ConfigError(f"{first} is not a config key (also when added with +); accepted keys "
                          f"of {group or 'the config'}: {accepted}")
    if "hydra" in cfg:
        raise ValueError("typed() takes a job config without its hydra node")
    values.integer("seed", cfg.seed, 0)  # first: every group's own seed interpolates it
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def compose_typed(overrides: Sequence[str] = ()) -> tuple[DictConfig, schema.Config]:
    """:func:`compose` and :func:`typed` of a command line."""
    cfg = compose(overrides)
    return cfg, typed(cfg)


def group_options(group: str) -> list[str]:
    """The options of a config group: its files in ``conf/<group>`` and its stored nodes."""
    schema.register()  # the readouts' options, whatever stored them last
    found = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    stored = ConfigStore.instance().repo.get(group, {})
    found |= {name.removesuffix(".yaml") for name in stored if isinstance(name, str)}
    return sorted(found)
