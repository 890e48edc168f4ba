"""Multiple-choice records and the per-dataset normalizers that make them from raw rows.

Each dataset's raw rows (one mapping per row, as a source yields them) are turned into an
:class:`MCRecord` by a small function. Source text is kept byte for byte (no stripping of
questions or options) unless lm-eval's task for that dataset transforms it: MMLU's
``{{question.strip()}}``, HellaSwag's ``preprocess``, COPA's ``premise.strip()[:-1]``, SciQ's
``support.lstrip()``. A prompt is then identical to lm-eval's for the same row.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from calibrate.errors import UserError


@dataclass(frozen=True)
class MCRecord:
    """One multiple-choice item."""

    question: str              # the text put in the template's {question}
    options: tuple[str, ...]   # option texts
    label: int                 # index of the correct option
    subject: str = ""          # e.g. "abstract algebra"; "" when the dataset has none
    # The dataset config name the loader read it for ("mmlu", "sst2", ...); "" when built by
    # hand. Not part of equality: the same item is the same record whoever labelled it.
    dataset: str = field(default="", compare=False)
    # The source row it was read from, named in messages ("row 12 (id 'Mercury_7')"); "" when
    # built by hand. Not part of equality either.
    origin: str = field(default="", compare=False)


class DatasetError(UserError):
    """A dataset config, file or row that cannot be used; the message names the bad value."""


def one_line(text: Any, limit: int = 200) -> str:
    """An error's text on one line, shortened."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


Row = Mapping[str, Any]
Normalizer = Callable[[Row], MCRecord]

SENTIMENT_OPTIONS = ("negative", "positive")
BOOL_OPTIONS = ("no", "yes")
COPA_CONNECTIVES = {"cause": "because", "effect": "therefore"}


# ---------------------------------------------------------------- field helpers

def _text(row: Row, key: str) -> str:
    """A string field exactly as the source has it (whitespace kept, as lm-eval keeps it)."""
    value = row[key]
    if not isinstance(value, str):
        raise TypeError(f"field {key!r} is {value!r}, expected a string")
    return value


def _int_label(value: Any) -> int:
    """An integer label from an int, a bool, an integral float or a string of digits."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    raise ValueError(f"label {value!r} is not an integer; accepted: an option index (an integer, "
                     "or a string of digits)")


def _letter_or_int(value: Any) -> int:
    """An answer given as a letter ``A``... or as an index."""
    letter = value.strip() if isinstance(value, str) else ""
    if len(letter) == 1 and letter in string.ascii_uppercase:
        return string.ascii_uppercase.index(letter)
    return _int_label(value)


def _bool_label(value: Any) -> int:
    """0 for false, 1 for true; accepts bools, 0/1 and the strings true/false."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    if isinstance(value, (bool, int)) and int(value) in (0, 1):
        return int(value)
    raise ValueError(f"answer {value!r} is not a boolean")


def _string_list(value: Any, key: str) -> list[str]:
    """A list of option strings, each kept as given; a JSON list in a string (a CSV cell) too."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        value = json.loads(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"field {key!r} is {value!r}, expected a list of strings")
    return list(value)


def _keyed_choices(row: Row, key_field: str) -> tuple[tuple[str, ...], int]:
    """Options and label from ``choices: {text, label}`` and an answer key (ARC, OpenBookQA)."""
    choices = row["choices"]
    if isinstance(choices, str):
        choices = json.loads(choices)
    texts = _string_list(choices["text"], "choices.text")
    keys = [str(k).strip() for k in choices["label"]]
    if len(texts) != len(keys):
        raise ValueError(f"choices has {len(texts)} texts but {len(keys)} labels {keys}; "
                         "accepted: one label per text")
    answer = str(row[key_field]).strip()
    if answer not in keys:
        raise ValueError(f"{key_field} {answer!r} is not among the option labels {keys}")
    return tuple(texts), keys.index(answer)


# ---------------------------------------------------------------- per-dataset normalizers

def normalize_mmlu(row: Row) -> MCRecord:
    """MMLU: question, subject, choices, answer (index or letter). The question is stripped as
    lm-eval's template does (``{{question.strip()}}``); the choices are kept as they are."""
    return MCRecord(_text(row, "question").strip(), tuple(_string_list(row["choices"], "choices")),
                    _letter_or_int(row["answer"]), _text(row, "subject").strip().replace("_", " "))


def normalize_arc(row: Row) -> MCRecord:
    """ARC: question, choices {text, label}, answerKey (a letter or a digit)."""
    options, label = _keyed_choices(row, "answerKey")
    return MCRecord(_text(row, "question"), options, label)


def normalize_openbookqa(row: Row) -> MCRecord:
    """OpenBookQA: question_stem, choices {text, label}, answerKey."""
    options, label = _keyed_choices(row, "answerKey")
    return MCRecord(_text(row, "question_stem"), options, label)


def _split_answers(cell: Any) -> list[str]:
    """TruthfulQA CSV answers, separated by ';' (some cells end with a stray one)."""
    if not isinstance(cell, str):
        raise TypeError(f"answers {cell!r} are not a string")
    # dict.fromkeys: one CSV row repeats an incorrect answer; a duplicate option would split mass.
    return list(dict.fromkeys(a.strip() for a in cell.split(";") if a.strip()))


def normalize_truthfulqa(row: Row) -> MCRecord:
    """TruthfulQA MC1, correct option first (shuffled later): the hub form or the original CSV."""
    if "mc1_targets" in row:
        targets = row["mc1_targets"]
        choices = _string_list(targets["choices"], "mc1_targets.choices")
        labels = [_int_label(v) for v in targets["labels"]]
        if labels.count(1) != 1 or len(labels) != len(choices):
            raise ValueError(f"mc1_targets labels {labels} must mark exactly one of "
                             f"{len(choices)} choices")
        best = labels.index(1)
        rest = [c for i, c in enumerate(choices) if i != best]
        return MCRecord(_text(row, "question"), (choices[best], *rest), 0)
    incorrect = _split_answers(row["Incorrect Answers"])
    return MCRecord(_text(row, "Question"), (_text(row, "Best Answer"), *incorrect), 0)


def sentiment_normalizer(field: str) -> Normalizer:
    """Binary sentiment rows ``{field, label}`` with label 0 negative, 1 positive."""
    def normalize(row: Row) -> MCRecord:
        return MCRecord(_text(row, field), SENTIMENT_OPTIONS, _int_label(row["label"]))
    return normalize


def normalize_copa(row: Row) -> MCRecord:
    """COPA as lm-eval: ``premise.strip()[:-1]`` (its final period) + connective; options start
    lower-case (lm-eval's ``convert_choice``)."""
    connective = COPA_CONNECTIVES.get(str(row["question"]).strip())
    if connective is None:
        raise ValueError(f"question {row['question']!r} is not one of {list(COPA_CONNECTIVES)}")
    premise = _text(row, "premise").strip()[:-1]
    options = tuple(c[:1].lower() + c[1:] for c in (_text(row, "choice1"), _text(row, "choice2")))
    return MCRecord(f"{premise} {connective}", options, _int_label(row["label"]))


def normalize_boolq(row: Row) -> MCRecord:
    """BoolQ: passage + question as lm-eval's prompt, answer no/yes."""
    question = f"{_text(row, 'passage')}\nQuestion: {_text(row, 'question')}?"
    return MCRecord(question, BOOL_OPTIONS, _bool_label(row["answer"]))


def _hellaswag_clean(text: str) -> str:
    """lm-eval's ``preprocess`` of WikiHow artifacts (`` [title]``, ``[step]``, double spaces),
    exactly: stripped first, not after the replacements."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def normalize_hellaswag(row: Row) -> MCRecord:
    """HellaSwag as lm-eval: ``activity: ctx_a Ctx_b`` and cleaned endings."""
    ctx_b = _text(row, "ctx_b").capitalize()
    ctx = f"{_text(row, 'activity_label')}: {_text(row, 'ctx_a')} {ctx_b}"
    endings = [_hellaswag_clean(e) for e in _string_list(row["endings"], "endings")]
    return MCRecord(_hellaswag_clean(ctx), tuple(endings), _int_label(row["label"]))


def normalize_piqa(row: Row) -> MCRecord:
    """PIQA: goal, sol1, sol2, label."""
    return MCRecord(_text(row, "goal"), (_text(row, "sol1"), _text(row, "sol2")),
                    _int_label(row["label"]))


def normalize_sciq(row: Row) -> MCRecord:
    """SciQ as lm-eval ("{support}\nQuestion: {question}", the newline kept when there is no
    support), correct answer first (shuffled later)."""
    support = str(row.get("support") or "").lstrip()
    options = (_text(row, "correct_answer"), _text(row, "distractor1"),
               _text(row, "distractor2"), _text(row, "distractor3"))
    return MCRecord(f"{support}\nQuestion: {_text(row, 'question')}", options, 0)
