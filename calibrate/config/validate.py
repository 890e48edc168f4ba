"""Cheap checks of a composed job config, run before any data or model is loaded."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from calibrate.engine.probe import OPTION_MASS_MODES


class ConfigError(ValueError):
    """A config value is invalid; the message names it and what is accepted."""


def parse_eta(value: Any) -> list[float]:
    """η as a list of finite floats; accepts one number or a list of numbers."""
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if not values:
        raise ConfigError("eta is an empty list; give a number or a list of numbers, e.g. eta=4")
    out = []
    for item in values:
        if isinstance(item, bool):
            raise ConfigError(f"eta={item!r} is not a number; accepted: finite numbers")
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise ConfigError(f"eta={item!r} is not a number; accepted: finite numbers") from None
        if not math.isfinite(number):
            raise ConfigError(f"eta={item!r} is not finite; accepted: finite numbers")
        out.append(number)
    return out


def _positive_int(name: str, value: Any, allow: Sequence[Any] = ()) -> None:
    if value in allow:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        accepted = " or ".join([*(repr(a) for a in allow), "an integer >= 1"])
        raise ConfigError(f"{name}={value!r}; accepted: {accepted}")


def check_probe(cfg: Mapping[str, Any]) -> None:
    """The ``probe`` group."""
    _positive_int("probe.batch_size", cfg.get("batch_size"), allow=("auto", None))
    _positive_int("probe.max_batch_size", cfg.get("max_batch_size"))
    _positive_int("probe.max_tokens", cfg.get("max_tokens"))
    fill = cfg.get("min_fill")
    if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not 0 <= fill <= 1:
        raise ConfigError(f"probe.min_fill={fill!r}; accepted: a number in [0, 1]")
    if not isinstance(cfg.get("prefix_reuse", True), bool):
        raise ConfigError(f"probe.prefix_reuse={cfg.get('prefix_reuse')!r}; accepted: true, false")
    if cfg.get("option_mass") not in OPTION_MASS_MODES:
        raise ConfigError(f"probe.option_mass={cfg.get('option_mass')!r}; "
                          f"accepted: {', '.join(OPTION_MASS_MODES)}")


def check_metrics(cfg: Mapping[str, Any]) -> None:
    """The ``metrics`` group (:class:`calibrate.config.settings.MetricSettings`)."""
    from calibrate.config.settings import MetricSettings

    MetricSettings.from_mapping(cfg)


def check_model(cfg: Mapping[str, Any]) -> None:
    """The ``model`` group (values only; the architecture is checked from the model's config).
    The rules are the model package's own (:class:`calibrate.model.config.ModelConfig`)."""
    from calibrate.model.config import ModelConfig

    ModelConfig.from_mapping(cfg, ConfigError).check(ConfigError)


def check_tracker(cfg: Mapping[str, Any]) -> None:
    """The ``tracker`` group (:class:`calibrate.io.track.TrackerSettings`)."""
    from calibrate.io.track import TrackerSettings

    TrackerSettings.from_mapping(cfg, ConfigError)


def interventions() -> list[str]:
    """The intervention group's options: the config files of ``conf/intervention``."""
    from calibrate.config import CONF_DIR

    return sorted(p.stem for p in (CONF_DIR / "intervention").glob("*.yaml"))


def check_intervention(cfg: Mapping[str, Any]) -> None:
    """The ``intervention``, ``direction`` and ``nullspace`` groups (values; layer ranges are
    checked against the model once its depth is known)."""
    from calibrate.config.settings import DirectionSettings, InterventionSettings, NullspaceSettings

    InterventionSettings.from_mapping(cfg["intervention"])
    if cfg.get("direction"):
        DirectionSettings.from_mapping(cfg["direction"])
    if cfg.get("nullspace"):
        NullspaceSettings.from_mapping(cfg["nullspace"])


def check_resume(value: Any) -> None:
    """``resume`` must be a real boolean: "maybe" would otherwise count as true."""
    if not isinstance(value, bool):
        raise ConfigError(f"resume={value!r}; accepted: true, false")


def check_job(cfg: Mapping[str, Any]) -> None:
    """Every cheap check of a job config (the spec's own, :func:`calibrate.config.spec.build_spec`);
    raises :class:`ConfigError` or a dataset error."""
    from calibrate.config.spec import build_spec

    build_spec(cfg)
