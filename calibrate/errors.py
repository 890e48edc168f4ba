"""The errors that mean bad input (a clear message, exit status 2), gathered in one place."""

from __future__ import annotations

from calibrate.adapters import UnsupportedArchitecture
from calibrate.assets import AssetError
from calibrate.data import DatasetError
from calibrate.direction import DirectionError
from calibrate.models import ModelConfigError
from calibrate.prompts import PromptError
from calibrate.results import OutputError
from calibrate.steer import SteeringError
from calibrate.validate import ConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DatasetError, PromptError, ModelConfigError, UnsupportedArchitecture, AssetError,
    DirectionError, SteeringError, OutputError,
)


def one_line(err: BaseException) -> str:
    """An error's message on one line (Hydra's lists of options folded in)."""
    text = str(err) or type(err).__name__
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    return " ".join(parts)
