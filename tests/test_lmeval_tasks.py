"""lm-eval tasks by name: lm-eval's own contexts, and at the last layer lm-eval's own answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibrate.engine.probe import ProbeSettings
from calibrate.engine.scoring import score
from calibrate.tasks.continuations import cloze_divisors
from calibrate.tasks.data import load_records
from calibrate.tasks.lmeval_tasks import resolve_tasks, task_names
from calibrate.tasks.prompts import build_prompts
from calibrate.tasks.records import DatasetError
from tests.conftest import build_tiny, typed

DOCS = [
    {"question": "the movie was great", "choices": ["good", "very bad", "fun film"], "label": 0},
    {"question": "a very boring film", "choices": ["good", "bad"], "label": 1},
    {"question": "it was not fun", "choices": ["yes", "no", "the film", "bad"], "label": 3},
    {"question": "this film is terrible", "choices": ["bad", "great"], "label": 0},
    {"question": "the answer is yes", "choices": ["no", "yes"], "label": 1},
]
CLOZE_TASK = """task: toy_cloze
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {data}, train: {data}}}}}
validation_split: validation
fewshot_split: train
output_type: multiple_choice
doc_to_text: "question : {{{{question}}}} ? answer :"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
"""
LETTERS_TASK = """task: toy_letters
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {data}}}}}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{question}}}} . A : good B : bad C : fun . answer :"
doc_to_choice: ["A", "B", "C"]
doc_to_target: "{{{{label % 3}}}}"
metric_list: [{{metric: acc}}]
"""
OTHER_TASKS = {
    "toy_generate": "task: toy_generate\ndataset_path: json\noutput_type: generate_until\n"
                    "doc_to_text: q\ndoc_to_target: a\n",
    "toy_scored": "task: toy_scored\ndataset_path: json\noutput_type: multiple_choice\n"
                  "doc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n"
                  "process_results: !function utils.score\n",
    "toy_colon": "task: toy_colon\ndataset_path: json\noutput_type: multiple_choice\n"
                 "doc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n"
                 "target_delimiter: ':'\n",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lmeval_tasks")
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "toy_cloze.yaml").write_text(CLOZE_TASK.format(data=data))
    (folder / "toy_letters.yaml").write_text(LETTERS_TASK.format(data=data))
    for name, text in OTHER_TASKS.items():
        (folder / f"{name}.yaml").write_text(text)
    (folder / "utils.py").write_text("def score(doc, results):\n    return {}\n")
    return folder


def test_task_names_accepts_one_a_comma_list_or_a_list():
    assert task_names("arc_easy") == ("arc_easy",)
    assert task_names("arc_easy, piqa,arc_easy") == ("arc_easy", "piqa")
    assert task_names(["piqa", "sciq"]) == ("piqa", "sciq")
    for bad in (None, "", [], [1], 3):
        with pytest.raises(DatasetError, match="dataset.task .* is invalid; accepted"):
            task_names(bad)


def test_lmeval_composes_with_the_default_model_and_needs_a_task(task_dir):
    cfg = typed("dataset=lmeval", f"dataset.include_path={task_dir}", "dataset.task=toy_cloze",
                "seed=3")
    assert (cfg.model.name, cfg.dataset.name, cfg.dataset.seed) == ("smollm2", "lmeval", 3)
    assert (cfg.dataset.split, cfg.dataset.template, cfg.dataset.fewshot_seed) == \
        ("eval", "{question}", 1234)
    with pytest.raises(DatasetError, match=r"dataset.task None is invalid; accepted: an lm-eval"):
        typed("dataset=lmeval")


def test_reading_follows_the_task_definition(task_dir):
    cloze = resolve_tasks("toy_cloze", str(task_dir))
    assert (cloze.tasks, cloze.answer_format, cloze.cloze_norm) == (("toy_cloze",), "cloze", "char")
    letters = resolve_tasks(["toy_letters"], str(task_dir))
    assert (letters.answer_format, letters.cloze_norm) == ("letters", "none")
    both = resolve_tasks("toy_letters,toy_cloze", str(task_dir))  # mixed: every task as cloze
    assert (both.tasks, both.answer_format) == (("toy_letters", "toy_cloze"), "cloze")
    assert both.cloze_norm == "none"  # toy_letters reports acc only


@pytest.mark.parametrize("task, message", [
    ("toy_clozee", r"'toy_clozee' is not an lm-eval task, group or tag; close: toy_cloze"),
    ("toy_generate", r"'toy_generate' has output_type 'generate_until'; accepted: multiple_choice"),
    ("toy_scored", r"'toy_scored' scores its documents with its own process_results"),
    ("toy_colon", r"'toy_colon' joins context and choice with ':'; accepted: .*' '"),
])
def test_bad_input_tasks_are_refused_by_name(task_dir, task, message):
    with pytest.raises(DatasetError, match=message):
        typed("dataset=lmeval", f"dataset.include_path={task_dir}", f"dataset.task={task}")


def test_bad_input_lmeval_keys_and_prompt_style(task_dir, tmp_path):
    with pytest.raises(DatasetError, match=r"dataset.task is for dataset=lmeval only"):
        typed("dataset=sst2", "dataset.task=toy_cloze")
    with pytest.raises(DatasetError, match=r"include_path '.*nowhere' is not a folder"):
        typed("dataset=lmeval", f"dataset.include_path={tmp_path / 'nowhere'}",
              "dataset.task=toy_cloze")
    with pytest.raises(DatasetError, match=r"num_fewshot -1 is invalid; accepted: null"):
        typed("dataset=lmeval", f"dataset.include_path={task_dir}", "dataset.task=toy_cloze",
              "dataset.num_fewshot=-1")
    with pytest.raises(DatasetError, match=r"answer_format 'letters' for lm-eval task"):
        typed("dataset=lmeval", f"dataset.include_path={task_dir}", "dataset.task=toy_cloze",
              "dataset.answer_format=letters")
    from calibrate.tasks.shots import PromptStyleError, check_style

    cfg = typed("dataset=lmeval", f"dataset.include_path={task_dir}", "dataset.task=toy_cloze",
                "prompt.shots=2")
    with pytest.raises(PromptStyleError, match=r"prompt.shots=2 .* with dataset=lmeval"):
        check_style(cfg.prompt, cfg.dataset)


def _lmeval_samples(model, tokenizer, task: str, task_dir: Path, shots: int) -> list[dict]:
    """lm-eval's own --log_samples records for ``task`` on ``model``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu")
    out = simple_evaluate(model=lm, tasks=[task], num_fewshot=shots, log_samples=True,
                          task_manager=TaskManager(include_path=str(task_dir)),
                          fewshot_random_seed=1234, random_seed=0, numpy_random_seed=0,
                          torch_random_seed=0)
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


@pytest.mark.parametrize("task, shots", [("toy_cloze", 1), ("toy_letters", 0)])
def test_last_layer_is_lmevals_own_answer(task_dir, word_tokenizer, task, shots):
    """Same contexts as lm-eval builds, and at the last layer its log-likelihoods, acc and
    acc_norm on every document (lm-eval run on the same tiny model)."""
    from calibrate.model.load import wrap_model

    model = build_tiny("llama", len(word_tokenizer))
    cfg = typed("dataset=lmeval", f"dataset.include_path={task_dir}", f"dataset.task={task}",
                f"dataset.num_fewshot={shots}")
    records = load_records(cfg.dataset)
    assert [r.origin for r in records] == [f"row {i} (doc_id {i})" for i in range(len(DOCS))]
    ps = build_prompts(records, cfg.dataset, word_tokenizer)
    res = score(wrap_model(model, word_tokenizer, name="tiny-llama"), ps,
                ProbeSettings(progress=False, option_mass="final"))
    samples = _lmeval_samples(model, word_tokenizer, task, task_dir, shots)
    assert len(samples) == len(DOCS)
    scores = res.option_logits[:, -1].astype(np.float64)
    if ps.is_cloze:
        logliks = scores * cloze_divisors(list(ps.requests), ps.cloze_norm)
    else:
        from calibrate.io.tidy import option_logprobs

        logliks = option_logprobs(scores, res.option_mass[:, -1])
    for i, sample in enumerate(samples):
        assert ps.prompts[i] == sample["arguments"][0][0]  # lm-eval's context, exemplars included
        theirs = np.array([r[0][0] for r in sample["resps"]])
        ours = logliks[i, :len(theirs)]
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
        assert sample["acc"] == float(np.argmax(res.probs[i, -1]) == res.labels[i]) \
            or cfg.dataset.cloze_norm == "char"
        if cfg.dataset.cloze_norm == "char":  # the reading lm-eval's acc_norm makes
            assert sample["acc_norm"] == float(np.argmax(res.probs[i, -1]) == res.labels[i])
            assert sample["acc"] == float(np.argmax(ours) == res.labels[i])
    modulo = 3 if task == "toy_letters" else 99  # toy_letters' target is the label modulo 3
    assert res.labels.tolist() == [d["label"] % modulo for d in DOCS]
