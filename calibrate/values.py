"""Checks of single config values, shared by every package's typed settings.

Each settings dataclass validates its own fields in ``__post_init__`` with these helpers, so a
value is checked once, next to its type, whoever builds it (Hydra's composition through
``OmegaConf.to_object``, or a caller in Python). Every message names the key, the value and what
is accepted; the error is :class:`calibrate.errors.ConfigError` unless the caller passes its own
:class:`~calibrate.errors.UserError` subclass. Imports nothing of calibrate but its errors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from calibrate.errors import ConfigError, UserError

PATH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_HINT = "a plain name of letters, digits, '.', '_' and '-', starting with a letter or digit"


def choice(key: str, value: Any, accepted: Sequence[str], error: type[UserError] = ConfigError
           ) -> str:
    """``value`` when it is one of ``accepted``."""
    if not isinstance(value, str) or value not in accepted:
        raise error(f"{key}={value!r}; accepted: {', '.join(accepted)}")
    return value


def number(key: str, value: Any, ok: Callable[[float], bool], accepted: str,
           error: type[UserError] = ConfigError) -> float:
    """A finite real number for which ``ok`` holds (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not ok(value):
        raise error(f"{key}={value!r}; accepted: {accepted}")
    return float(value)


def integer(key: str, value: Any, minimum: int | None = None,
            error: type[UserError] = ConfigError) -> int:
    """An integer (not a bool), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, int) \
            or (minimum is not None and value < minimum):
        accepted = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        raise error(f"{key}={value!r}; accepted: {accepted}")
    return value


def optional_integer(key: str, value: Any, minimum: int | None = None,
                     error: type[UserError] = ConfigError) -> int | None:
    """``None`` or an integer of at least ``minimum``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) \
            or (minimum is not None and value < minimum):
        accepted = "null or an integer" + (f" >= {minimum}" if minimum is not None else "")
        raise error(f"{key}={value!r}; accepted: {accepted}")
    return value


def flag(key: str, value: Any, error: type[UserError] = ConfigError) -> bool:
    """A real boolean: ``bool("off")`` is True, so strings are never read as booleans here."""
    if not isinstance(value, bool):
        raise error(f"{key}={value!r}; accepted: true, false")
    return value


def text(key: str, value: Any, error: type[UserError] = ConfigError) -> str:
    """A string (a list or a number where text is expected is an error, not its repr)."""
    if not isinstance(value, str):
        raise error(f"{key}={value!r} is a {type(value).__name__}; accepted: a string")
    return value


def optional_text(key: str, value: Any, error: type[UserError] = ConfigError) -> str | None:
    """``None`` or a string."""
    return None if value is None else text(key, value, error)


def is_path_name(value: Any) -> bool:
    """Whether ``value`` is a plain file name: letters, digits, ``._-``, not starting with ``.``
    or ``-``; never a separator, NUL or ``..``, so it cannot leave its folder."""
    return isinstance(value, str) and PATH_NAME.fullmatch(value) is not None and ".." not in value


def path_name(key: str, value: Any, error: type[Exception] = ConfigError) -> str:
    """``value`` when it can name a file or folder (:func:`is_path_name`)."""
    if not is_path_name(value):
        raise error(f"{key}={value!r} cannot name a file or folder; accepted: {NAME_HINT}")
    return value


def layer_list(key: str, value: Any, allow: Sequence[Any] = (),
               error: type[UserError] = ConfigError) -> Any:
    """A non-empty list of layer numbers as a tuple, or one of ``allow`` (e.g. ``None``, "auto")."""
    if any(value == a and type(value) is type(a) for a in allow):
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value or any(
            isinstance(v, bool) or not isinstance(v, int) for v in value):
        accepted = " or ".join([*(repr(a) for a in allow), "a non-empty list of layer numbers"])
        raise error(f"{key}={_shown(value)}; accepted: {accepted}")
    return tuple(int(v) for v in value)


def _shown(value: Any) -> str:
    return repr(list(value)) if isinstance(value, (list, tuple)) else repr(value)
