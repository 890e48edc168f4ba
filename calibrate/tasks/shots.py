"""Prompt styles: k in-context exemplars before the question, and the tokenizer's chat template.

The ``prompt`` config block (:class:`PromptStyle`): ``shots`` (0: zero-shot, the default),
``chat_template`` (false) and ``seed`` (the exemplar draw). Exemplars are drawn as lm-eval draws
them and never overlap the evaluated records (nor, therefore, the calibration split fit on them):

* MMLU: the first k rows of the subject's ``dev`` split, in order (lm-eval's ``first_n`` sampler
  on ``fewshot_split: dev``); each subject has 5, so ``shots`` <= 5, and the evaluated split must
  not be ``dev``.
* every other dataset: one seeded draw (``prompt.seed``) of k records of the evaluated split that
  the job does not evaluate (those beyond ``dataset.limit``); when fewer than k are left over,
  the k are drawn from the whole split and removed from the evaluated records (recorded:
  ``removed_from_evaluated``).

Every question of a subject (every question, outside MMLU) shares the same exemplars, so the
prompts share one token prefix (:mod:`calibrate.engine.prefix` runs it once). The exemplars'
positions in their split are recorded in metrics.json (:meth:`Exemplars.summary`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibrate import values
from calibrate.errors import UserError
from calibrate.tasks.dataset_config import DatasetConfig
from calibrate.tasks.records import DatasetError, MCRecord

MMLU_SHOT_SPLIT = "dev"
MMLU_SHOTS_PER_SUBJECT = 5  # the dev split holds 5 rows of every subject


class PromptStyleError(UserError):
    """A ``prompt`` value is invalid; the message names it and what is accepted."""


@dataclass
class PromptStyle:
    """The ``prompt`` config block, typed and checked."""

    shots: int = 0
    chat_template: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        err = PromptStyleError
        if isinstance(self.shots, bool) or not isinstance(self.shots, int) or self.shots < 0:
            raise err(f"prompt.shots={self.shots!r}; accepted: an integer >= 0 (0: zero-shot)")
        values.flag("prompt.chat_template", self.chat_template, err)
        values.integer("prompt.seed", self.seed, 0, err)

    @property
    def is_plain(self) -> bool:
        """Zero-shot without a chat template: prompts exactly as the dataset's template gives."""
        return self.shots == 0 and not self.chat_template

    def summary(self) -> dict[str, Any]:
        """The style as metrics.json records it."""
        return {"shots": self.shots, "chat_template": self.chat_template}


def check_style(style: PromptStyle, dataset: DatasetConfig,
                error: type[Exception] = PromptStyleError) -> None:
    """Checks that need only the configs (before any data is read)."""
    if dataset.name == "lmeval" and not style.is_plain:
        raise error(f"prompt.shots={style.shots} / prompt.chat_template={style.chat_template} "
                    "with dataset=lmeval: lm-eval's task builds the prompt; accepted: "
                    "prompt.shots=0 and prompt.chat_template=false, with dataset.num_fewshot "
                    "for exemplars")
    if dataset.name != "mmlu" or style.shots == 0:
        return
    if style.shots > MMLU_SHOTS_PER_SUBJECT:
        raise error(f"prompt.shots={style.shots} for mmlu: the exemplars are the subject's "
                    f"{MMLU_SHOT_SPLIT} split, which holds {MMLU_SHOTS_PER_SUBJECT} rows; "
                    f"accepted: 0..{MMLU_SHOTS_PER_SUBJECT}")
    if dataset.split == MMLU_SHOT_SPLIT and not dataset.local_path:
        raise error(f"prompt.shots={style.shots} with dataset.split={dataset.split!r}: mmlu's "
                    f"exemplars come from its {MMLU_SHOT_SPLIT} split, which would then be "
                    "evaluated too; accepted: dataset.split=validation or test")


@dataclass(frozen=True)
class Exemplars:
    """The exemplars of each subject ("" : every record's), and where they came from."""

    by_subject: Mapping[str, tuple[MCRecord, ...]]
    ids: tuple[dict[str, Any], ...]           # {split, row, subject} of every exemplar
    drawn_from: str                            # how they were drawn (metrics.json)
    removed_from_evaluated: int = 0            # records dropped from the evaluated set
    shots: int = field(default=0)

    def of(self, record: MCRecord) -> tuple[MCRecord, ...]:
        """The exemplars shown before ``record``."""
        if "" in self.by_subject:
            return self.by_subject[""]
        return self.by_subject[record.subject]

    def group(self, record: MCRecord) -> str:
        """Prompts of one group share their exemplars (and so a token prefix)."""
        return "" if "" in self.by_subject else record.subject

    def summary(self) -> dict[str, Any]:
        """What metrics.json records about the exemplars."""
        return {"shots": self.shots, "exemplars_drawn_from": self.drawn_from,
                "exemplar_ids": [dict(i) for i in self.ids],
                "removed_from_evaluated": self.removed_from_evaluated}


def _mmlu_exemplars(dataset: DatasetConfig, k: int, cache_dir: str | Path | None) -> Exemplars:
    from calibrate.tasks.data import load_split

    dev = load_split(dataset, cache_dir, split=MMLU_SHOT_SPLIT)
    by_subject: dict[str, list[MCRecord]] = {}
    for record in dev:  # source order within each subject: lm-eval's first_n takes the first k
        by_subject.setdefault(record.subject, []).append(record)
    chosen: dict[str, tuple[MCRecord, ...]] = {}
    ids: list[dict[str, Any]] = []
    for subject, rows in by_subject.items():
        if len(rows) < k:
            raise DatasetError(f"prompt.shots={k}: mmlu subject {subject!r} has {len(rows)} "
                               f"{MMLU_SHOT_SPLIT} rows; accepted: prompt.shots <= {len(rows)}")
        chosen[subject] = tuple(rows[:k])
        ids += [{"split": MMLU_SHOT_SPLIT, "subject": subject, "row": i} for i in range(k)]
    return Exemplars(chosen, tuple(ids), f"mmlu {MMLU_SHOT_SPLIT} split, the first {k} rows of "
                     "each subject in order (lm-eval's first_n)", 0, k)


def draw_exemplars(records: Sequence[MCRecord], evaluated: Sequence[int], k: int, seed: int,
                   split: str) -> tuple[Exemplars, list[int]]:
    """k seeded exemplars among ``records`` (a whole split) outside ``evaluated`` (positions);
    when fewer than k are left over, drawn from the whole split and removed from ``evaluated``.
    Returns the exemplars and the evaluated positions that remain."""
    taken = set(evaluated)
    pool = [i for i in range(len(records)) if i not in taken]
    removed = 0
    if len(pool) >= k:
        how = f"{split} rows not evaluated, seeded draw (prompt.seed={seed})"
    else:
        if len(records) - k < 1:
            raise DatasetError(f"prompt.shots={k} but the {split} split holds {len(records)} "
                               f"records, and at least one must be left to evaluate; accepted: "
                               f"prompt.shots <= {len(records) - 1}")
        pool = list(range(len(records)))
        how = (f"{split} rows, seeded draw (prompt.seed={seed}), removed from the evaluated "
               "records (too few rows outside dataset.limit)")
    order = list(pool)
    random.Random(seed).shuffle(order)  # a prefix of one permutation: 1 shot is 5 shots' first
    chosen = order[:k]
    remaining = [i for i in evaluated if i not in set(chosen)]
    removed = len(evaluated) - len(remaining)
    ids = tuple({"split": split, "row": i} for i in chosen)
    return Exemplars({"": tuple(records[i] for i in chosen)}, ids, how, removed, k), remaining


def load_with_exemplars(dataset: DatasetConfig, style: PromptStyle,
                        cache_dir: str | Path | None = None
                        ) -> tuple[list[MCRecord], Exemplars | None]:
    """The evaluated records and, with ``style.shots`` > 0, their exemplars (disjoint)."""
    from calibrate.tasks.data import evaluated_indices, load_records, load_split

    check_style(style, dataset, DatasetError)
    if style.shots == 0:
        return load_records(dataset, cache_dir), None
    if dataset.name == "mmlu":
        return load_records(dataset, cache_dir), _mmlu_exemplars(dataset, style.shots, cache_dir)
    split = load_split(dataset, cache_dir)
    evaluated = evaluated_indices(len(split), dataset)
    exemplars, remaining = draw_exemplars(split, evaluated, style.shots, style.seed,
                                          dataset.split)
    return [split[i] for i in remaining], exemplars
