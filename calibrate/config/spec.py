"""The job spec: built once from the composed config, checked, and carrying the result's identity.

Everything a job decides from its config is decided here, once: which study runs (``probe``,
``steering``, ``nullspace``, ``direction_ablate``), the η values (normalised, 0 first), the
intervention settings, and the identity of the result — a hash of the *result-relevant* config
(every key but those that cannot change a number: tracking, resume, cache folder, progress bars,
batching, plot switches). Caches and resume compare that identity; metrics.json records it.

Checks that need the model's shape (layer ranges, null-space k) run in :func:`check_shape` on
the shape read from the model's config, before any weight is read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from calibrate.config import CONF_DIR
from calibrate.config.settings import (
    DirectionSettings,
    InterventionSettings,
    MetricSettings,
    NullspaceSettings,
    OutputSettings,
    PhaseSettings,
)
from calibrate.config.validate import ConfigError, check_probe, check_resume, parse_eta

# Keys (dotted prefixes) that cannot change a reported number; left out of the identity.
NON_RESULT_KEYS = ("tracker", "resume", "cache_dir", "hydra", "checks", "probe.progress",
                   "probe.batch_size", "probe.max_batch_size", "probe.max_tokens", "probe.min_fill",
                   "probe.prefix_reuse", "output.plots")


@functools.lru_cache(maxsize=1)
def process_uid() -> str:
    """Six hex digits, fixed for this process: part of every run and sweep folder name."""
    return secrets.token_hex(3)


if not OmegaConf.has_resolver("calibrate_uid"):
    OmegaConf.register_new_resolver("calibrate_uid", process_uid, use_cache=True)


@dataclass(frozen=True)
class JobSpec:
    """One job, decided: the study, its η values, every group typed, and its identity."""

    config: Mapping[str, Any]          # the resolved config (plain containers), as recorded
    study: str                         # one of the registered studies
    etas: tuple[float, ...]            # steering: 0 first, then the others in order; else ()
    intervention: InterventionSettings  # for η alone with intervention=none: the direction's
    seed: int
    identity: str                      # config_hash(config)
    model: Any = None                  # calibrate.model.config.ModelConfig
    dataset: Any = None                # calibrate.tasks.dataset_config.DatasetConfig
    probe: Any = None                  # calibrate.engine.probe.ProbeSettings
    metrics: MetricSettings = MetricSettings()
    phases: PhaseSettings = PhaseSettings()
    direction: DirectionSettings = DirectionSettings()
    nullspace: NullspaceSettings = NullspaceSettings()
    output: OutputSettings = OutputSettings()
    tracker: Any = None                # calibrate.io.track.TrackerSettings
    study_settings: Any = None         # the study's own (Study.settings), e.g. the baselines'
    cache_dir: str | None = None
    prompt: Any = None                 # calibrate.tasks.shots.PromptStyle (shots, chat template)

    @property
    def uses_split(self) -> bool:
        """True when the study fits on a calibration split and reports the evaluation split."""
        return self.study != "probe"

    def relevant(self) -> dict[str, Any]:
        """The result-relevant part of the config (what :attr:`identity` hashes)."""
        return result_config(self.config)


def _plain(cfg: Any) -> dict[str, Any]:
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return json.loads(json.dumps(cfg, default=str))


def _drop(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(leaf, None)


def result_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config without the keys that cannot change a result (:data:`NON_RESULT_KEYS`)."""
    tree = _plain(cfg)
    for key in NON_RESULT_KEYS:
        _drop(tree, key)
    return tree


def config_hash(cfg: Mapping[str, Any]) -> str:
    """sha256 (16 hex digits) of the result-relevant config, canonical JSON."""
    text = json.dumps(result_config(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": value}``; lists stay values."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, Mapping) and value else {name: value})
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every result-relevant key that differs (sorted)."""
    a, b = flatten(result_config(old)), flatten(result_config(new))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"seed={value!r}; accepted: an integer")
    return value


def decide_study(cfg: Mapping[str, Any]) -> str:
    """The study a config asks for: the intervention's, or ``steering`` when η is given with
    ``intervention=none`` (any η, 0 included: every job of an η sweep is a steering job)."""
    name = cfg["intervention"]["name"]
    if name == "none":
        return "steering" if cfg.get("eta") is not None else "probe"
    return "steering" if name == "direction" else name


def steering_etas(value: Any) -> tuple[float, ...]:
    """η values to run: 0 first (the reference of every delta), then the others, deduplicated."""
    etas = parse_eta(0 if value is None else value)
    return (0.0, *[e for e in dict.fromkeys(etas) if e != 0.0])


def _intervention(cfg: Mapping[str, Any], study: str) -> InterventionSettings:
    icfg = dict(cfg["intervention"])
    if study == "steering" and icfg["name"] == "none":  # eta given alone: the direction defaults
        icfg = _plain(OmegaConf.load(CONF_DIR / "intervention" / "direction.yaml"))
    return InterventionSettings.from_mapping(icfg)


def _study_class(study: str) -> Any:
    from calibrate.studies import STUDIES

    if study not in STUDIES:
        raise ConfigError(f"intervention={study!r} names no study; accepted: "
                          f"{', '.join(sorted(STUDIES))}")
    return STUDIES[study]


def build_spec(cfg: Mapping[str, Any]) -> JobSpec:
    """Check a composed config (cheap checks only, nothing loaded) and decide the job: every
    group is read here, once, into its typed settings."""
    from calibrate.engine.probe import ProbeSettings
    from calibrate.io.track import TrackerSettings
    from calibrate.model.config import ModelConfig
    from calibrate.tasks.dataset_config import DatasetConfig
    from calibrate.tasks.shots import PromptStyle, check_style

    cfg = _plain(cfg)
    seed = _seed(cfg.get("seed", 0))
    # Each group is checked by building its settings, in check_job's order (same first error).
    model = ModelConfig.from_mapping(cfg["model"], ConfigError).check(ConfigError)
    dataset = DatasetConfig.from_mapping(cfg["dataset"])
    prompt = PromptStyle.from_mapping(cfg.get("prompt"), ConfigError)
    check_style(prompt, dataset, ConfigError)
    check_probe(cfg["probe"])
    metrics = MetricSettings.from_mapping(cfg["metrics"])
    tracker = TrackerSettings.from_mapping(cfg["tracker"], ConfigError)
    check_resume(cfg.get("resume", False))
    etas = steering_etas(cfg.get("eta"))  # η parsed once; kept for steering studies only
    InterventionSettings.from_mapping(cfg["intervention"])
    direction = DirectionSettings.from_mapping(cfg["direction"])
    nullspace = NullspaceSettings.from_mapping(cfg["nullspace"])
    study = decide_study(cfg)
    return JobSpec(
        cfg, study, etas if study == "steering" else (), _intervention(cfg, study), seed,
        config_hash(cfg), model=model, dataset=dataset,
        probe=ProbeSettings.from_config(cfg["probe"]), metrics=metrics,
        phases=PhaseSettings.from_mapping(cfg.get("phases") or {}),
        direction=direction, nullspace=nullspace,
        output=OutputSettings.from_mapping(cfg.get("output") or {}, cfg.get("checks") or {}),
        tracker=tracker, study_settings=_study_class(study).settings(cfg),
        cache_dir=cfg.get("cache_dir"), prompt=prompt)


def _layers_in(name: str, layers: Any, low: int, high: int) -> None:
    if layers in (None, "auto"):
        return
    bad = [l for l in layers if not low <= int(l) <= high]
    if bad:
        raise ConfigError(f"{name}={list(layers)}: layer(s) {bad} outside this model's "
                          f"{low}..{high}; accepted: layer numbers in {low}..{high}")


def check_shape(spec: JobSpec, num_blocks: int, hidden_size: int) -> None:
    """Checks that need the model's shape (from its config): layer ranges and null-space k."""
    if spec.study == "probe":
        return
    last = num_blocks  # layers are 0 (embeddings) .. num_blocks (the last block's output)
    _layers_in("intervention.layers", spec.intervention.layers, 0, last)
    if not spec.direction.path:
        _layers_in("direction.layers", spec.direction.layers, 1, last)
    method = spec.direction.method
    if method in ("gradient", "probe"):  # the layer the method fits at, when set
        layer = ((spec.config.get("direction") or {}).get(method) or {}).get("layer")
        if layer is not None:
            _layers_in(f"direction.{method}.layer", [layer], 0, last)
    if spec.study == "nullspace":
        k, fraction = spec.nullspace.k, spec.nullspace.fraction
        if k is None:
            k = round(fraction * hidden_size)
        if not 0 <= int(k) <= hidden_size:
            raise ConfigError(f"nullspace.k={k} (fraction {fraction} of hidden "
                              f"{hidden_size}); accepted: 0..{hidden_size}")


def eta_edit_ratio(etas: tuple[float, ...], scale: float | None, residual_norm: float) -> float:
    """Largest ‖η·ĉ‖ (ĉ unit; times the layer's residual norm with ``residual_norm`` scale)
    relative to the mean residual norm at the edited layer."""
    largest = max((abs(e) for e in etas), default=0.0) * (scale if scale else 1.0)
    return largest / residual_norm if residual_norm > 0 and math.isfinite(residual_norm) else math.inf
