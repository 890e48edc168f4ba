"""What transformers could not place when it read a checkpoint, as one phrase for an error line.

``from_pretrained(..., output_loading_info=True)`` reports the weights the model expects but the
files lack (re-initialised at random), those the files hold but the model has no place for
(dropped: e.g. 20 blocks when config.json says fewer), and those of another shape. Weights tied
to another (``lm_head.weight`` with ``tie_word_embeddings``) and the keys a model class declares
ignorable (``_keys_to_ignore_on_load_*``, old rotary buffers) are already left out by
transformers, so anything reported means the numbers would not be the checkpoint's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

SHOWN = 3  # keys named per kind; the rest are counted


def _natural(key: str) -> list[Any]:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _named(keys: Iterable[str]) -> str:
    """The first :data:`SHOWN` keys in natural order, and how many more."""
    ordered = sorted(keys, key=_natural)
    shown = ", ".join(ordered[:SHOWN])
    return shown + (f", ... {len(ordered) - SHOWN} more" if len(ordered) > SHOWN else "")


def _shape(shape: Any) -> str:
    return "x".join(str(int(n)) for n in shape)


def weight_mismatch(info: Mapping[str, Any]) -> str | None:
    """One phrase naming the missing, unexpected and mismatched weights of a loading-info dict
    (first few of each and their count), or None when the checkpoint filled the model exactly."""
    missing = set(info.get("missing_keys") or ())
    unexpected = set(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: _natural(m[0]))
    parts = []
    if missing:
        parts.append(f"{len(missing)} weight(s) the model needs are not in the files and would be "
                     f"random ({_named(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) in the files have no place in the model and "
                     f"would be dropped ({_named(unexpected)})")
    if mismatched:
        shown = ", ".join(f"{key}: {_shape(ckpt)} in the files, {_shape(model)} in the model"
                          for key, ckpt, model in mismatched[:SHOWN])
        more = f", ... {len(mismatched) - SHOWN} more" if len(mismatched) > SHOWN else ""
        parts.append(f"{len(mismatched)} weight(s) have another shape ({shown}{more})")
    return "; ".join(parts) or None


class _NoLoadReport(logging.Filter):
    """Drops transformers' multi-line load report table; the other warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextmanager
def quiet_load_report() -> Iterator[None]:
    """While loading: transformers' own report of missing/unexpected weights is not printed
    (:func:`weight_mismatch` turns the same information into the one error line)."""
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _NoLoadReport()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
