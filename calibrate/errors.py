"""The errors that mean bad input (a clear message, exit status 2), gathered in one place."""

from __future__ import annotations

from calibrate.config.validate import ConfigError
from calibrate.core.direction import DirectionError
from calibrate.engine.steer import SteeringError
from calibrate.io.results import OutputError
from calibrate.model.adapters import UnsupportedArchitecture
from calibrate.model.assets import AssetError
from calibrate.model.load import ModelConfigError
from calibrate.tasks.data import DatasetError
from calibrate.tasks.prompts import PromptError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DatasetError, PromptError, ModelConfigError, UnsupportedArchitecture, AssetError,
    DirectionError, SteeringError, OutputError,
)


def one_line(err: BaseException) -> str:
    """An error's message on one line (Hydra's lists of options folded in)."""
    text = str(err) or type(err).__name__
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    return " ".join(parts)
