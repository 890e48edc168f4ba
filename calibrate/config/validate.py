"""Cheap checks of a composed job config, run before any data or model is loaded."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from calibrate.core.metrics import BINNINGS
from calibrate.engine.probe import OPTION_MASS_MODES

TRACKERS = ("wandb", "none")
TRACKER_MODES = ("offline", "online", "disabled")
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
    if cfg.get("option_mass") not in OPTION_MASS_MODES:
        raise ConfigError(f"probe.option_mass={cfg.get('option_mass')!r}; "
                          f"accepted: {', '.join(OPTION_MASS_MODES)}")


def check_metrics(cfg: Mapping[str, Any]) -> None:
    """The ``metrics`` group."""
    _positive_int("metrics.n_bins", cfg.get("n_bins"))
    for extra in cfg.get("extra_bins") or []:
        _positive_int("metrics.extra_bins[]", extra)
    boot = cfg.get("bootstrap", 0)
    if isinstance(boot, bool) or not isinstance(boot, int) or boot < 0:
        raise ConfigError(f"metrics.bootstrap={boot!r}; accepted: an integer >= 0")
    alpha = cfg.get("alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ConfigError(f"metrics.alpha={alpha!r}; accepted: a number strictly between 0 and 1")
    margin = cfg.get("ece_margin", 3)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:
        raise ConfigError(f"metrics.ece_margin={margin!r}; accepted: a number >= 0")
    if cfg.get("binning") not in BINNINGS:
        raise ConfigError(f"metrics.binning={cfg.get('binning')!r}; accepted: {', '.join(BINNINGS)}")


def check_model(cfg: Mapping[str, Any]) -> None:
    """The ``model`` group (values only; the architecture is checked from the model's config).
    The rules are the model package's own (:class:`calibrate.model.config.ModelConfig`)."""
    from calibrate.model.config import ModelConfig

    ModelConfig.from_mapping(cfg, ConfigError).check(ConfigError)


def check_tracker(cfg: Mapping[str, Any]) -> None:
    """The ``tracker`` group."""
    if cfg.get("name") not in TRACKERS:
        raise ConfigError(f"tracker={cfg.get('name')!r}; accepted: {', '.join(TRACKERS)}")
    if cfg.get("name") == "wandb" and cfg.get("mode") not in TRACKER_MODES:
        raise ConfigError(f"tracker.mode={cfg.get('mode')!r}; accepted: {', '.join(TRACKER_MODES)}")


def interventions() -> list[str]:
    """The intervention group's options: the config files of ``conf/intervention``."""
    from calibrate.config import CONF_DIR

    return sorted(p.stem for p in (CONF_DIR / "intervention").glob("*.yaml"))


def _choice(name: str, value: Any, accepted: Sequence[str]) -> None:
    if value not in accepted:
        raise ConfigError(f"{name}={value!r}; accepted: {', '.join(accepted)}")


def _layer_list(name: str, value: Any, allow: Sequence[Any] = ()) -> None:
    if value in allow:
        return
    if not isinstance(value, Sequence) or isinstance(value, str) or not value or any(
            isinstance(v, bool) or not isinstance(v, int) for v in value):
        accepted = " or ".join([*(repr(a) for a in allow), "a non-empty list of layer numbers"])
        raise ConfigError(f"{name}={value!r}; accepted: {accepted}")


def check_intervention(cfg: Mapping[str, Any]) -> None:
    """The ``intervention``, ``direction`` and ``nullspace`` groups (values; layer ranges are
    checked against the model once its depth is known)."""
    # accepted values come from the modules that implement them (imported here: they import us)
    from calibrate.engine.steer import ETA_SCALES, POSITIONS
    from calibrate.studies.ablation import ABLATIONS
    from calibrate.studies.directions import DIRECTION_METHODS

    icfg = cfg["intervention"]
    _choice("intervention", icfg.get("name"), interventions())
    if icfg["name"] != "none":
        _choice("intervention.position", icfg.get("position"), POSITIONS)
        _layer_list("intervention.layers", icfg.get("layers"), allow=(None,))
    if icfg["name"] == "direction":
        _choice("intervention.eta_scale", icfg.get("eta_scale"), ETA_SCALES)
    if icfg["name"] in ("nullspace", "direction_ablate"):
        _choice("intervention.ablation", icfg.get("ablation"), ABLATIONS)
    dcfg = cfg.get("direction") or {}
    if dcfg:
        _choice("direction.method", dcfg.get("method"), list(DIRECTION_METHODS))
        _layer_list("direction.layers", dcfg.get("layers"), allow=("auto",))
        fraction = dcfg.get("calibration_fraction")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ConfigError(f"direction.calibration_fraction={fraction!r}; accepted: a number "
                              "strictly between 0 and 1")
    ncfg = cfg.get("nullspace") or {}
    if ncfg.get("k") is not None:
        k = ncfg["k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"nullspace.k={k!r}; accepted: null or an integer >= 0")
    if ncfg:
        fraction = ncfg.get("fraction")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConfigError(f"nullspace.fraction={fraction!r}; accepted: a number in (0, 1]")
        _positive_int("nullspace.n_random", ncfg.get("n_random"))


def check_job(cfg: Mapping[str, Any]) -> None:
    """Every cheap check of a job config; raises :class:`ConfigError` or a dataset error."""
    from calibrate.tasks.data import validate_dataset_config

    check_model(cfg["model"])
    validate_dataset_config(cfg["dataset"])
    check_probe(cfg["probe"])
    check_metrics(cfg["metrics"])
    check_tracker(cfg["tracker"])
    if not isinstance(cfg.get("resume", False), bool):  # "maybe" would otherwise count as true
        raise ConfigError(f"resume={cfg.get('resume')!r}; accepted: true, false")
    if cfg.get("eta") is not None:  # null: no steering
        parse_eta(cfg["eta"])
    if "intervention" in cfg:
        check_intervention(cfg)
