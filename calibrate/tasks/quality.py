"""Data that loads but cannot be scored as given, found before any tokenization or weights.

Pure functions over records (and a tokenizer's vocabulary) and :class:`DataChecks`, the counts
:func:`~calibrate.tasks.prompts.build_prompts` attaches to the :class:`PromptSet` it returns
(``prompt_set.data_checks``; the job writes ``data_checks.summary()`` into metrics.json):

* records that repeat an earlier record's question and options (:func:`duplicate_records`; a
  steering job warns when a group straddles its calibration and evaluation splits,
  :func:`straddling_groups`);
* rows that list one option text twice (:func:`repeated_options`): in the cloze format identical
  texts get identical scores and the argmax takes the first, so the copies are merged into one
  option (:func:`merge_repeated_options`); letters tell them apart, so they are only counted;
* the tokenizer's control tokens (``<|im_end|>``, BOS/EOS, any added special token) written as
  data text (:func:`control_token_finder`), which a tokenizer turns into real control tokens.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, is_dataclass, replace
from types import SimpleNamespace
from typing import Any

import numpy as np

from calibrate.tasks.records import MCRecord

LOG = logging.getLogger("calibrate")
NAMED_EXAMPLES = 5  # how many examples a message names before "... (n more)"


@dataclass(frozen=True)
class DataChecks:
    """What :func:`~calibrate.tasks.prompts.build_prompts` found in the data it rendered.

    ``duplicate_groups`` are positions in the prompt set (:meth:`subset` maps them); the counts
    are of the prompts as built.
    """

    duplicate_groups: tuple[tuple[int, ...], ...] = ()  # records with one question and options
    conflicting_groups: int = 0        # of those groups: copies that disagree on the label
    repeated_option_rows: int = 0      # rows listing an option text more than once
    answer_on_repeat: int = 0          # of those: the answer was a later copy of its text
    merged_options: int = 0            # cloze: copies merged into their first occurrence
    control_token_rows: int = 0        # plain prompts: rows whose text holds a control token

    @property
    def duplicate_records(self) -> int:
        """Records that repeat an earlier one (each group's copies beyond its first)."""
        return sum(len(g) - 1 for g in self.duplicate_groups)

    def summary(self) -> dict[str, int]:
        """The counts, for metrics.json."""
        return {"duplicate_records": self.duplicate_records,
                "duplicate_groups": len(self.duplicate_groups),
                "conflicting_duplicate_groups": self.conflicting_groups,
                "repeated_option_rows": self.repeated_option_rows,
                "answer_on_repeated_option": self.answer_on_repeat,
                "merged_options": self.merged_options,
                "control_token_rows": self.control_token_rows}

    def subset(self, idx: Sequence[int] | np.ndarray) -> DataChecks:
        """The same counts, with the duplicate groups as positions among ``idx``."""
        where = {int(old): new for new, old in enumerate(idx)}
        groups = tuple(g for g in (tuple(sorted(where[i] for i in grp if i in where))
                                   for grp in self.duplicate_groups) if len(g) > 1)
        return replace(self, duplicate_groups=groups)


# ---------------------------------------------------------------- naming examples

def example_name(index: int, record: Any, what: str = "example") -> str:
    """``example 3``, with the source row when the record has one: ``example 3 (row 12)``."""
    origin = getattr(record, "origin", "")
    return f"{what} {index} ({origin})" if origin else f"{what} {index}"


def first_examples(indices: Sequence[int], records: Sequence[Any],
                   limit: int = NAMED_EXAMPLES) -> str:
    """The first ``limit`` examples at ``indices``, named, and how many more there are."""
    names = ", ".join(example_name(i, records[i]) for i in indices[:limit])
    return names + (f", ... ({len(indices) - limit} more)" if len(indices) > limit else "")


# ---------------------------------------------------------------- repeated records

def duplicate_records(records: Sequence[MCRecord]) -> tuple[tuple[int, ...], ...]:
    """Groups (positions, ascending) of records with the same question and options, in order of
    their first record; records that appear once are in no group."""
    groups: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault((record.question, tuple(record.options)), []).append(index)
    return tuple(tuple(g) for g in groups.values() if len(g) > 1)


def conflicting_groups(records: Sequence[MCRecord],
                       groups: Sequence[Sequence[int]]) -> int:
    """How many groups of repeated records disagree on the correct option."""
    return sum(len({records[i].label for i in g}) > 1 for g in groups)


def straddling_groups(groups: Sequence[Sequence[int]], calibration: Sequence[int] | np.ndarray,
                      evaluation: Sequence[int] | np.ndarray) -> int:
    """How many groups of repeated records have members on both sides of a split."""
    cal, ev = {int(i) for i in calibration}, {int(i) for i in evaluation}
    return sum(bool(cal.intersection(g)) and bool(ev.intersection(g)) for g in groups)


def warn_straddling(groups: Sequence[Sequence[int]], calibration: Sequence[int] | np.ndarray,
                    evaluation: Sequence[int] | np.ndarray) -> int:
    """Warn when groups of repeated records straddle a calibration/evaluation split; the count."""
    count = straddling_groups(groups, calibration, evaluation)
    if count:
        LOG.warning("%d group(s) of repeated records (same question and options) have copies in "
                    "both the calibration and the evaluation split: the direction is fit on "
                    "items it is then evaluated on", count)
    return count


# ---------------------------------------------------------------- repeated options

def repeated_options(options: Sequence[str]) -> tuple[int, ...]:
    """Positions of the options whose text equals an earlier option's."""
    seen: set[str] = set()
    out = []
    for k, text in enumerate(options):
        if text in seen:
            out.append(k)
        seen.add(text)
    return tuple(out)


def merge_repeated_options(record: Any) -> Any:
    """The record with each option text once (first occurrences, in order), the label moved to
    its text's first occurrence."""
    distinct = tuple(dict.fromkeys(record.options))
    if len(distinct) == len(record.options):
        return record
    return with_fields(record, options=distinct,
                       label=distinct.index(record.options[record.label]))


def with_fields(record: Any, **changes: Any) -> Any:
    """A copy of a record (an :class:`MCRecord` or any object with its fields) with changes."""
    if is_dataclass(record):
        return replace(record, **changes)
    return SimpleNamespace(**{**vars(record), **changes})


# ---------------------------------------------------------------- control tokens as data text

def control_tokens(tokenizer: Any) -> dict[str, int]:
    """Every control token of a tokenizer, content -> id: its special tokens (BOS, EOS, pad,
    unk, additional ones) and every added token marked special."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    out: dict[str, int] = {}
    for token_id, added in dict(getattr(tok, "added_tokens_decoder", None) or {}).items():
        content = str(getattr(added, "content", added))
        if getattr(added, "special", False) and content:
            out[content] = int(token_id)
    for content in getattr(tok, "all_special_tokens", None) or ():
        if content and content not in out:
            token_id = tok.convert_tokens_to_ids(content)
            if isinstance(token_id, int) and token_id >= 0:
                out[content] = token_id
    return out


def _pattern(contents: Sequence[str]) -> re.Pattern[str] | None:
    """One regex matching any of ``contents`` (longest first); None when there are none."""
    unique = sorted({c for c in contents if c}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, unique))) if unique else None


def control_token_finder(tokenizer: Any) -> Callable[[str], list[str]]:
    """A function giving the control tokens (their contents, in order of first appearance) that
    the tokenizer would find in a text, as its added vocabulary matches them: on the raw text,
    and on the normalized text for tokens marked ``normalized`` (their content normalized too)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    tokens = control_tokens(tok)
    normalizer = getattr(getattr(tok, "backend_tokenizer", None), "normalizer", None)
    decoder: Mapping[int, Any] = dict(getattr(tok, "added_tokens_decoder", None) or {})
    raw, normalized = [], {}
    for content, token_id in tokens.items():
        if normalizer is not None and getattr(decoder.get(token_id), "normalized", False):
            normalized[normalizer.normalize_str(content)] = content
        else:
            raw.append(content)
    raw_pattern, norm_pattern = _pattern(raw), _pattern(list(normalized))

    def find(text: str) -> list[str]:
        found = raw_pattern.findall(text) if raw_pattern else []
        if norm_pattern:
            found += [normalized[m] for m in norm_pattern.findall(normalizer.normalize_str(text))]
        return list(dict.fromkeys(found))

    return find


def record_texts(record: Any) -> tuple[str, ...]:
    """The data text of a record that a prompt can show: question, subject, options."""
    return (record.question, record.subject, *record.options)
