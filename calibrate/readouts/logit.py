"""``lens=logit``: the logit lens (:class:`calibrate.engine.lens.LogitLens`), the default readout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from calibrate import values
from calibrate.engine.lens import LogitLens
from calibrate.engine.readout import Readout
from calibrate.readouts.readout_kind import ReadoutKind, ReadoutSource, register_readout


@dataclass
class LogitLensSettings:
    """The logit lens has no settings: the model's own final norm and unembedding."""

    name: str = "logit"

    def __post_init__(self) -> None:
        values.choice("lens", self.name, ("logit",))


@register_readout
class Logit(ReadoutKind):
    """Every layer through the model's final norm (recomputed per layer) and unembedding."""

    name = "logit"
    Settings = LogitLensSettings

    def build(self, settings: Any, source: ReadoutSource) -> Readout:
        return LogitLens(source.loaded.adapter)
