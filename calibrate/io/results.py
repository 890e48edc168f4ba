"""Job outputs, written atomically: a job that dies leaves no file that looks complete.

Every file is written to a temporary name in the same folder and renamed into place; the file
gets the mode a plain ``open`` would give it (``0o666 & ~umask``), not ``mkstemp``'s 0600, so a
team sharing a cluster filesystem can read results and cache entries.
``metrics.json`` is written last and is the job's completion marker: a job directory without
it (or whose ``metrics.json`` has ``status`` other than ``complete``) is not a finished result.

A job folder that cannot be written, or a disk that fills up while writing, is an
:class:`OutputError` (a ``ValueError``, one line naming the path and the reason), never a bare
``OSError`` traceback. One job owns a folder at a time (:class:`JobLock`): a second job started
into it is refused (:class:`FolderLocked`), and a lock left by a killed job is taken over. Caches use :func:`cache_unwritable` and :func:`warn_cache_unwritable`: a
read-only or full cache is reported once per process and the job goes on without it.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from calibrate import values
from calibrate.errors import UserError

METRICS_FILE = "metrics.json"
LAYERS_FILE = "layers.csv"
PREDICTIONS_FILE = "predictions.npz"
ERROR_FILE = "error.json"
LOCK_FILE = ".calibrate.lock"

LOGGER = logging.getLogger("calibrate")
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
# What a read-only, foreign or full cache raises; anything else is a real error.
_CACHE_ERRNOS = _FULL | {errno.EACCES, errno.EPERM, errno.EROFS}
_WARNED_CACHES: set[str] = set()


@dataclass
class OutputSettings:
    """The ``output`` group: which optional files a job writes."""

    predictions: bool = True  # predictions.npz: labels and every layer's option scores
    plots: bool = True

    def __post_init__(self) -> None:
        values.flag("output.predictions", self.predictions)
        values.flag("output.plots", self.plots)


class OutputError(UserError):
    """The job's results cannot be written (folder not writable, disk full)."""


def safe_stem(name: str) -> str:
    """``name`` when it can name a file in its folder (no separator, no ``..``)."""
    return values.path_name("file name", name, OutputError)


def is_safe_stem(name: object) -> bool:
    """Whether ``name`` can name a file in its folder (:func:`safe_stem`)."""
    return values.is_path_name(name)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it straight back
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a newly created file gets from ``open``: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode a newly created folder gets from ``mkdir``: ``0o777 & ~umask``."""
    return 0o777 & ~_umask()


def share_dir(path: Path) -> Path:
    """Give a ``mkdtemp`` folder (0700) the umask's mode before it is renamed into place."""
    try:
        os.chmod(path, dir_mode())
    except OSError:
        pass
    return path


def _share(fd: int) -> None:
    """Give an open temporary file the umask's mode (best effort: some mounts refuse chmod)."""
    try:
        os.fchmod(fd, file_mode())
    except OSError:
        pass


def _reason(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


def check_writable(job_dir: Path) -> None:
    """Fail early, in one line, when ``job_dir`` cannot be created or written.

    Creates the folder if needed, then creates and removes a temporary file in it.

    Raises:
        OutputError: naming the folder and the reason (permission denied, read-only file
            system, disk full, a file in the way ...).
    """
    job_dir = Path(job_dir)
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=job_dir, prefix=".write-check.", suffix=".tmp")
        try:
            os.close(fd)
        finally:
            os.unlink(tmp)
    except OSError as err:
        raise OutputError(f"cannot write results to {job_dir}: {_reason(err)}") from err


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write ``path`` through ``write(handle)`` on a temporary file, then rename it into place.

    The file ends with mode ``0o666 & ~umask``. On any failure no temporary file remains and an
    existing ``path`` keeps its old content; a full disk or exhausted quota (ENOSPC, EDQUOT)
    is raised as :class:`OutputError`, other errors as they are.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                _share(handle.fileno())
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        if err.errno in _FULL:
            raise OutputError(f"disk full while writing {path} ({_reason(err)}); "
                              f"free space or write elsewhere") from err
        raise
    return path


def cache_unwritable(err: BaseException) -> bool:
    """Whether ``err`` (or the OSError behind an :class:`OutputError`) means the cache cannot
    be written: permission denied, read-only file system, disk full or quota exceeded."""
    if isinstance(err, OutputError) and isinstance(err.__cause__, OSError):
        err = err.__cause__
    return isinstance(err, OSError) and err.errno in _CACHE_ERRNOS


def warn_cache_unwritable(cache_dir: Path, err: BaseException) -> None:
    """Log once per process and cache folder that ``cache_dir`` is not writable."""
    key = str(cache_dir)
    if key in _WARNED_CACHES:
        return
    _WARNED_CACHES.add(key)
    cause = err.__cause__ if isinstance(err, OutputError) and err.__cause__ else err
    reason = _reason(cause) if isinstance(cause, OSError) else str(cause)
    LOGGER.warning("cache %s is not writable (%s); going on without caching", cache_dir, reason)


def write_text(path: Path, text: str) -> Path:
    """Atomically write a UTF-8 text file."""
    return atomic_write(path, lambda h: h.write(text.encode("utf-8")))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    """Atomically write JSON (numpy scalars and arrays converted)."""
    return write_text(path, json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")


def write_csv(path: Path, table: pd.DataFrame) -> Path:
    """Atomically write a DataFrame as CSV without its index, full float precision."""
    return write_text(path, table.to_csv(index=False, float_format="%.17g"))


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    """Atomically write compressed numpy arrays."""
    return atomic_write(path, lambda h: np.savez_compressed(h, **arrays))


def merge_json(path: Path, values: Mapping[str, Any]) -> Path:
    """Merge ``values`` into the JSON object at ``path`` (created if missing), atomically."""
    path = Path(path)
    existing = json.loads(path.read_text()) if path.exists() else {}
    if not isinstance(existing, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return write_json(path, {**existing, **values})


def read_metrics(job_dir: Path) -> dict[str, Any] | None:
    """The job's metrics.json, or None when the job did not complete."""
    path = Path(job_dir) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return data if isinstance(data, dict) and data.get("status") == "complete" else None


def remove_outputs(job_dir: Path, names: list[str]) -> None:
    """Delete named result files (used when a job fails, so nothing half-made remains)."""
    for name in names:
        (Path(job_dir) / name).unlink(missing_ok=True)


# --- one job per folder ------------------------------------------------------------------------


class FolderLocked(OutputError):
    """Another running job holds the job folder (nothing is written to it)."""


def _owner() -> str:
    return f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


_HELD_HERE: set[Path] = set()  # lock files this process holds


def _held_by_a_live_owner(fd: int, path: Path) -> bool:
    """Without flock (file systems that lack it): whether the recorded owner still holds the
    lock: a running process of this host (this one only while it holds ``path``); an owner on
    another host counts as running."""
    parts = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
    if len(parts) < 2 or not parts[0].isdigit():
        return False
    pid, host = int(parts[0]), parts[1]
    if host != socket.gethostname():
        return True
    return path in _HELD_HERE if pid == os.getpid() else _pid_alive(pid)


class JobLock:
    """Exclusive ownership of a job folder for the whole job: ``fcntl.flock`` on
    ``<job_dir>/.calibrate.lock``, which records the owner (pid, host, start time).

    The kernel drops the flock when its holder dies, so a lock file left by a killed job is
    simply taken over; on a file system without flock, a recorded owner whose pid no longer runs
    on this host is. Released (and the file removed) by :meth:`release` or on leaving a
    ``with`` block. Usage::

        with JobLock(job_dir).acquire():
            ...  # the job
    """

    def __init__(self, job_dir: Path) -> None:
        self.job_dir = Path(job_dir)
        self.path = self.job_dir.absolute() / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> JobLock:
        """Take the folder, creating it if needed.

        Raises:
            FolderLocked: another running job holds it (one line naming the folder and the
                holder).
            OutputError: the folder or its lock file cannot be created.
        """
        try:
            self.job_dir.mkdir(parents=True, exist_ok=True)
            while self._fd is None:
                self._fd = self._try_once()
        except OSError as err:
            raise OutputError(f"cannot lock {self.job_dir}: {_reason(err)}") from err
        return self

    def _try_once(self) -> int | None:
        """The locked descriptor, or None when the file was replaced meanwhile (try again)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
            os.close(fd)
            who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
            raise FolderLocked(f"{self.job_dir} is in use by another job ({who}); wait for it "
                               "to finish, or choose another output folder") from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            if _held_by_a_live_owner(fd, self.path):
                os.close(fd)
                raise FolderLocked(f"{self.job_dir} is in use by another job (recorded in "
                                   f"{self.path}); wait for it to finish, or choose another "
                                   "output folder") from None
        try:  # a holder that released meanwhile removed the file we opened: start again
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        if current is None or not os.path.samestat(os.fstat(fd), current):
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.pwrite(fd, _owner().encode("utf-8"), 0)
        _HELD_HERE.add(self.path)
        return fd

    def release(self) -> None:
        """Give the folder back: the lock file is removed, then the lock dropped."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD_HERE.discard(self.path)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> JobLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
