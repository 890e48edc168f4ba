"""Names from configs that become file or folder names, checked so they cannot leave their folder.

:func:`check_relative_path` accepts a ``/``-separated path of plain names
(:func:`calibrate.values.is_path_name`: a member inside an archive);
:func:`inside` refuses a path that resolves outside its base folder (a link pointing out).
:func:`entry_kind` says what a path is without opening it.
Each failure is one line of the caller's error type naming the key and the value.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from calibrate.values import NAME_HINT, is_path_name


def check_relative_path(key: str, value: object, error: type[Exception] = ValueError) -> str:
    """``value`` if it is a relative ``/``-separated path whose every part is a plain name
    (:func:`calibrate.values.is_path_name`), else one ``error`` line naming ``key`` and the
    value."""
    if not isinstance(value, str) or not all(is_path_name(part) for part in value.split("/")):
        raise error(f"{key}={value!r} cannot name a path inside its folder; accepted: a relative "
                    f"path of names separated by '/', each {NAME_HINT}")
    return value


def inside(base: Path, relative: str, key: str, error: type[Exception] = ValueError) -> Path:
    """``base / relative`` after checking it resolves inside ``base`` (links followed)."""
    path = base / check_relative_path(key, relative, error)
    if not path.resolve().is_relative_to(base.resolve()):
        raise error(f"{key}={relative!r} resolves outside {str(base)!r} (to "
                    f"{str(path.resolve())!r}); accepted: a path inside that folder")
    return path


FOLDER, REGULAR, MISSING = "a folder", "a regular file", "nothing"


def entry_kind(path: str | os.PathLike[str]) -> str:
    """What is at ``path``, links followed, found with ``stat`` alone (a FIFO is never opened):
    :data:`FOLDER`, :data:`REGULAR`, :data:`MISSING`, or a phrase such as ``"a FIFO (named pipe)"``
    or ``"a broken symbolic link (to '/x')"``."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)!r})"
        return MISSING
    except OSError as err:  # a path through a file, a link loop, no permission
        return f"not reachable ({err.strerror or type(err).__name__})"
    kinds = ((stat.S_ISDIR, FOLDER), (stat.S_ISREG, REGULAR), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "a special file")
