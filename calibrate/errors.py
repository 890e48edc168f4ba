"""The errors that mean bad input (a clear message, exit status 2), gathered in one place."""

from __future__ import annotations

from calibrate.adapters import UnsupportedArchitecture
from calibrate.assets import AssetError
from calibrate.data import DatasetError
from calibrate.models import ModelConfigError
from calibrate.prompts import PromptError
from calibrate.validate import ConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DatasetError, PromptError, ModelConfigError, UnsupportedArchitecture, AssetError,
)
