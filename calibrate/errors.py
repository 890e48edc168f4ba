"""The errors that mean bad input, and how they are shown: one line, exit status 2.

Every package raises its own subclass of :class:`UserError` (``DatasetError``, ``ModelConfigError``,
``DirectionError`` ...), so the entry points catch bad input with one ``except UserError``. This
module imports nothing of calibrate: every package may use it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message names the value and what would be accepted."""


class ConfigError(UserError):
    """A config value is invalid; the message names it and what is accepted."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)


def one_line(err: BaseException | str) -> str:
    """An error's message on one line (Hydra's lists of options folded in)."""
    text = err if isinstance(err, str) else (str(err) or type(err).__name__)
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    return " ".join(parts)
