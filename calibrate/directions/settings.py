"""The ``direction`` group: how ĉ is fit (or loaded) and on which split, with every method's block.

:class:`DirectionSettings` holds the keys every method shares; :func:`settings_class` adds one
block per registered method that has settings (``direction.gradient``, ``direction.probe`` ...),
typed by the method's own ``Settings`` dataclass, so Hydra checks a method's keys when it
composes and a new method needs no edit here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from calibrate import values
from calibrate.core.direction import DirectionError
from calibrate.core.effects import EFFECTS
from calibrate.core.random_null import NULLS
from calibrate.directions.direction_method import METHODS


@dataclass
class SourcePrompt:
    """``direction.source_prompt``: a prompt style to fit ĉ in; null keys: the job's own."""

    shots: int | None = None
    chat_template: bool | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        values.optional_integer("direction.source_prompt.shots", self.shots, 0)
        if self.chat_template is not None:
            values.flag("direction.source_prompt.chat_template", self.chat_template)
        values.optional_integer("direction.source_prompt.seed", self.seed, 0)

    def given(self) -> dict[str, Any]:
        """The keys set (the others follow the job's prompt style)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class CoordinateSettings:
    """``direction.coordinates``: where ĉ's squared norm sits, and ĉ steered without it."""

    top_k: int = 8  # ĉ's largest |coordinates| whose share of its squared norm is reported
    massive_ratio: float = 20.0  # massive activation: mean |x_i| > this x the median coordinate's
    steer_zeroed: bool = True  # also steer ĉ with those coordinates zeroed (effects.csv)

    def __post_init__(self) -> None:
        values.integer("direction.coordinates.top_k", self.top_k, 1)
        values.number("direction.coordinates.massive_ratio", self.massive_ratio,
                      lambda r: r > 1, "a number > 1")
        values.flag("direction.coordinates.steer_zeroed", self.steer_zeroed)


@dataclass
class DirectionSettings:
    """The ``direction`` group (see conf/config.yaml for every key)."""

    method: str = "layer_diff"
    layers: Any = "auto"  # residual layers of the differences; "auto": the detected correction
    calibration_fraction: float = 0.5
    seed: int = 0
    source: str | None = None  # fit on another dataset (its config name)
    path: str | None = None  # load a saved direction (.safetensors, or a repeng .gguf)
    allow_cross_model: bool = False
    source_limit: int | None = None
    source_prompt: SourcePrompt | None = None
    n_random: int | None = None  # random directions of the null (0: none); None: by the path
    n_random_read: int = 1000  # ... where the null needs no forward pass (last layer, one token)
    n_random_pass: int = 32  # ... where every random direction and eta runs blocks
    null: str = "isotropic"  # isotropic: uniform on the sphere | covariance: N(0, residual cov.)
    match: str = "kl"  # the effect ĉ's is matched by each random direction: kl | confidence | none
    match_tol: float = 1e-3  # relative tolerance of a matched eta
    match_max_factor: float = 1000.0  # matched eta searched within [eta / factor, eta * factor]
    coordinates: CoordinateSettings = field(default_factory=CoordinateSettings)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DirectionError(f"direction.method={self.method!r}; accepted: "
                                 f"{', '.join(METHODS)}")
        self.layers = values.layer_list("direction.layers", self.layers, ("auto",))
        values.number("direction.calibration_fraction", self.calibration_fraction,
                      lambda f: 0 < f < 1, "a number strictly between 0 and 1")
        values.integer("direction.seed", self.seed, 0)
        if self.source is not None:
            values.path_name("direction.source", self.source)
        values.optional_text("direction.path", self.path)
        values.flag("direction.allow_cross_model", self.allow_cross_model)
        values.optional_integer("direction.source_limit", self.source_limit, 1)
        values.optional_integer("direction.n_random", self.n_random, 0)
        values.integer("direction.n_random_read", self.n_random_read, 0)
        values.integer("direction.n_random_pass", self.n_random_pass, 0)
        values.choice("direction.null", self.null, NULLS)
        values.choice("direction.match", self.match, (*EFFECTS, "none"))
        values.number("direction.match_tol", self.match_tol, lambda t: 0 < t < 1,
                      "a number strictly between 0 and 1")
        values.number("direction.match_max_factor", self.match_max_factor, lambda f: f > 1,
                      "a number > 1")

    def random_count(self, reads_only: bool) -> int:
        """How many random directions the null draws: ``n_random``, else ``n_random_read``
        where the null needs no forward pass (``reads_only``), else ``n_random_pass``."""
        if self.n_random is not None:
            return self.n_random
        return self.n_random_read if reads_only else self.n_random_pass

    def method_settings(self) -> Any:
        """The chosen method's own block (None when the method has none)."""
        return getattr(self, self.method, None)

    def check_shape(self, num_blocks: int) -> None:
        """Checks that need the model's depth: the layers and the method's own."""
        if self.path is None and self.layers != "auto":
            bad = [layer for layer in self.layers if not 1 <= layer <= num_blocks]
            if bad:
                raise DirectionError(f"direction.layers={list(self.layers)}: layer(s) {bad} "
                                     f"outside this model's 1..{num_blocks}; accepted: layer "
                                     f"numbers in 1..{num_blocks}")
        METHODS[self.method].check_shape(self.method_settings(), num_blocks)


def settings_class() -> type[DirectionSettings]:
    """:class:`DirectionSettings` with one block per registered method that has settings."""
    blocks = tuple((name, method.Settings) for name, method in sorted(METHODS.items())
                   if method.Settings is not None)
    return _with_blocks(blocks)


_CLASSES: dict[tuple, type[DirectionSettings]] = {}


def _with_blocks(blocks: tuple[tuple[str, type], ...]) -> type[DirectionSettings]:
    if blocks not in _CLASSES:
        fields = [(name, cls, field(default_factory=cls)) for name, cls in blocks]
        _CLASSES[blocks] = dataclasses.make_dataclass(
            "DirectionSettings", fields, bases=(DirectionSettings,),
            namespace={"__doc__": DirectionSettings.__doc__, "__module__": __name__})
    return _CLASSES[blocks]
