"""Typed settings of the config groups a study reads, each checked where it is built.

``from_mapping`` is the one place a raw config group is read; every message names the value and
what is accepted. Accepted values come from the modules that implement them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from calibrate.config.validate import ConfigError, _positive_int


def _number(name: str, value: Any, ok, accepted: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ConfigError(f"{name}={value!r}; accepted: {accepted}")
    return float(value)


def _choice(name: str, value: Any, accepted: Sequence[str]) -> str:
    if value not in accepted:
        raise ConfigError(f"{name}={value!r}; accepted: {', '.join(accepted)}")
    return str(value)


def _layer_list(name: str, value: Any, allow: Sequence[Any] = ()) -> Any:
    if value in allow:
        return value
    if not isinstance(value, Sequence) or isinstance(value, str) or not value or any(
            isinstance(v, bool) or not isinstance(v, int) for v in value):
        accepted = " or ".join([*(repr(a) for a in allow), "a non-empty list of layer numbers"])
        raise ConfigError(f"{name}={value!r}; accepted: {accepted}")
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class MetricSettings:
    """The ``metrics`` group: binning, extra bin counts, bootstrap intervals."""

    n_bins: int = 15
    binning: str = "guo"
    extra_bins: tuple[int, ...] = (10,)
    bootstrap: int = 0
    alpha: float = 0.05
    seed: int = 0
    ece_margin: float = 3.0

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> MetricSettings:
        """Check and convert the ``metrics`` group."""
        from calibrate.core.metrics import BINNINGS

        _positive_int("metrics.n_bins", cfg.get("n_bins"))
        for extra in cfg.get("extra_bins") or []:
            _positive_int("metrics.extra_bins[]", extra)
        boot = cfg.get("bootstrap", 0)
        if isinstance(boot, bool) or not isinstance(boot, int) or boot < 0:
            raise ConfigError(f"metrics.bootstrap={boot!r}; accepted: an integer >= 0")
        alpha = _number("metrics.alpha", cfg.get("alpha", 0.05), lambda a: 0 < a < 1,
                        "a number strictly between 0 and 1")
        margin = _number("metrics.ece_margin", cfg.get("ece_margin", 3), lambda m: m >= 0,
                         "a number >= 0")
        return cls(int(cfg["n_bins"]), _choice("metrics.binning", cfg.get("binning"), BINNINGS),
                   tuple(int(b) for b in cfg.get("extra_bins") or ()), int(boot), alpha,
                   int(cfg.get("seed", 0)), margin)


@dataclass(frozen=True)
class PhaseSettings:
    """The ``phases`` group: what counts as a plateau and as a correction."""

    tolerance: float = 0.02
    min_drop: float = 0.0

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> PhaseSettings:
        """Check and convert the ``phases`` group."""
        return cls(_number("phases.tolerance", cfg.get("tolerance", 0.02), lambda t: t >= 0,
                           "a number >= 0"),
                   _number("phases.min_drop", cfg.get("min_drop", 0.0), lambda d: d >= 0,
                           "a number >= 0"))


@dataclass(frozen=True)
class InterventionSettings:
    """The ``intervention`` group (for η alone with ``intervention=none``: the direction's)."""

    name: str = "none"
    layers: tuple[int, ...] | None = None  # None: the last layer
    position: str = "last"
    eta_scale: str = "absolute"
    ablation: str = "zero"
    use_cache: bool = True

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> InterventionSettings:
        """Check and convert the ``intervention`` group."""
        from calibrate.config.validate import interventions
        from calibrate.engine.steer import ABLATIONS, ETA_SCALES, POSITIONS

        name = _choice("intervention", cfg.get("name"), interventions())
        if name == "none":
            return cls()
        return cls(name, _layer_list("intervention.layers", cfg.get("layers"), allow=(None,)),
                   _choice("intervention.position", cfg.get("position", "last"), POSITIONS),
                   _choice("intervention.eta_scale", cfg.get("eta_scale", "absolute"), ETA_SCALES)
                   if name == "direction" else "absolute",
                   _choice("intervention.ablation", cfg.get("ablation", "zero"), ABLATIONS)
                   if name in ("nullspace", "direction_ablate") else "zero",
                   bool(cfg.get("use_cache", True)))


@dataclass(frozen=True)
class DirectionSettings:
    """The ``direction`` group: how ĉ is fit (or loaded) and on which split."""

    method: str = "layer_diff"
    layers: tuple[int, ...] | str = "auto"
    calibration_fraction: float = 0.5
    seed: int = 0
    source: str | None = None
    path: str | None = None
    allow_cross_model: bool = False
    source_limit: int | None = None
    n_random: int = 32  # random directions of the null distribution (0: none)
    source_prompt: Mapping[str, Any] | None = None  # the prompt style c_hat is fit in (None: the job's)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> DirectionSettings:
        """Check and convert the ``direction`` group (methods: the registered ones)."""
        from calibrate.studies.directions import DIRECTION_METHODS

        method = _choice("direction.method", cfg.get("method"), list(DIRECTION_METHODS))
        layers = _layer_list("direction.layers", cfg.get("layers"), allow=("auto",))
        fraction = _number("direction.calibration_fraction", cfg.get("calibration_fraction"),
                           lambda f: 0 < f < 1, "a number strictly between 0 and 1")
        limit = cfg.get("source_limit")
        if limit is not None:
            _positive_int("direction.source_limit", limit)
        n_random = cfg.get("n_random", 32)
        if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
            raise ConfigError(f"direction.n_random={n_random!r}; accepted: an integer >= 0")
        _method_blocks(cfg)
        source_prompt = cfg.get("source_prompt")
        if source_prompt is not None:
            from calibrate.tasks.shots import PromptStyle

            if not isinstance(source_prompt, Mapping):
                raise ConfigError(f"direction.source_prompt={source_prompt!r}; accepted: null or "
                                  "a mapping such as {shots: 5, chat_template: false}")
            try:
                PromptStyle.from_mapping(source_prompt, ConfigError)
            except ConfigError as err:
                raise ConfigError(f"direction.source_{err}") from None
            source_prompt = dict(source_prompt)
        return cls(method, layers, fraction, int(cfg.get("seed", 0)), cfg.get("source"),
                   None if cfg.get("path") is None else str(cfg["path"]),
                   bool(cfg.get("allow_cross_model")), limit, n_random, source_prompt)


def _method_blocks(cfg: Mapping[str, Any]) -> None:
    """Check the ``direction.gradient`` and ``direction.probe`` blocks before any work (the
    methods read them again when they fit; layers against the model are checked there)."""
    from calibrate.core.direction import DirectionError
    from calibrate.core.gradient_fit import GradientSettings

    try:
        GradientSettings.from_mapping(cfg.get("gradient"))
    except (DirectionError, TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    probe = dict(cfg.get("probe") or {})
    unknown = sorted(set(probe) - {"layer", "c"})
    if unknown:
        raise ConfigError(f"direction.probe has unknown keys {unknown}; accepted: layer, c")
    _number("direction.probe.c", probe.get("c", 1.0), lambda c: c > 0, "a number > 0")
    layer = probe.get("layer")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise ConfigError(f"direction.probe.layer={layer!r}; accepted: null or a layer index >= 0")


@dataclass(frozen=True)
class NullspaceSettings:
    """The ``nullspace`` group: k (or its fraction of hidden) and the random baseline."""

    k: int | None = None
    fraction: float = 0.01
    n_random: int = 1000
    seed: int = 0
    n_control: int = 32  # random subspaces the truncation is compared with (0: none)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> NullspaceSettings:
        """Check and convert the ``nullspace`` group."""
        k = cfg.get("k")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ConfigError(f"nullspace.k={k!r}; accepted: null or an integer >= 0")
        fraction = _number("nullspace.fraction", cfg.get("fraction"), lambda f: 0 < f <= 1,
                           "a number in (0, 1]")
        _positive_int("nullspace.n_random", cfg.get("n_random"))
        n_control = cfg.get("n_control", 32)
        if isinstance(n_control, bool) or not isinstance(n_control, int) or n_control < 0:
            raise ConfigError(f"nullspace.n_control={n_control!r}; accepted: an integer >= 0")
        return cls(k, fraction, int(cfg["n_random"]), int(cfg.get("seed", 0)), n_control)


@dataclass(frozen=True)
class OutputSettings:
    """The ``output`` group and the ``checks`` thresholds."""

    predictions: bool = True
    plots: bool = True
    edit_ratio_warn: float = 100.0
    max_chars_per_token: float = 64.0  # prompts longer than context x this (characters): refused

    @classmethod
    def from_mapping(cls, output: Mapping[str, Any], checks: Mapping[str, Any]) -> OutputSettings:
        """Check and convert the ``output`` and ``checks`` groups."""
        ratio = _number("checks.edit_ratio_warn", checks.get("edit_ratio_warn", 100),
                        lambda r: r >= 0, "a number >= 0 (0: never warn)")
        chars = _number("checks.max_chars_per_token", checks.get("max_chars_per_token", 64),
                        lambda r: r > 0, "a number > 0")
        return cls(bool(output.get("predictions", True)), bool(output.get("plots", True)), ratio,
                   chars)
