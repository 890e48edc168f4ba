"""Prompts and answer tokens: records -> template strings, options -> one token id each."""

from __future__ import annotations

import logging
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from calibrate.errors import UserError
from calibrate.tasks.continuations import CLOZE_NORMS, ClozeRequest, build_requests
from calibrate.tasks.quality import (
    DataChecks,
    conflicting_groups,
    control_token_finder,
    control_tokens,
    duplicate_records,
    example_name,
    first_examples,
    merge_repeated_options,
    record_texts,
    repeated_options,
    with_fields,
)
from calibrate.tasks.records import one_line

if TYPE_CHECKING:
    from calibrate.tasks.dataset_config import DatasetConfig

ANSWER_FORMATS = ("letters", "verbalizer", "cloze")
TEMPLATE_FIELDS = ("subject", "question", "choices")  # the placeholders render_prompt fills
LETTERS = string.ascii_uppercase
LOG = logging.getLogger("calibrate")


class PromptError(UserError):
    """A template or an answer option cannot be used with this tokenizer."""


@dataclass(frozen=True)
class PromptConfig:
    """What rendering and answer tokens need of a dataset config, typed.

    :class:`~calibrate.tasks.dataset_config.DatasetConfig` gives one (``.prompt``) after its
    checks; built by hand it is not checked (:func:`build_prompts` raises :class:`PromptError`
    on bad values itself).
    """

    name: Any                                 # for messages only
    answer_format: str                        # one of ANSWER_FORMATS (checked on use)
    template: str
    subject: str = ""                         # the {subject} of records without one
    verbalizer: Sequence[str] | None = None   # verbalizer only: one word per option slot
    cloze_norm: str = "none"                  # cloze only: one of CLOZE_NORMS (checked on use)

    def __post_init__(self) -> None:
        if not isinstance(self.subject, str):
            raise PromptError(_not_text("dataset.subject", self.subject, "(the {subject} of "
                                        "records without one)"))

def as_prompt_config(cfg: PromptConfig | DatasetConfig) -> PromptConfig:
    """The :class:`PromptConfig` of either typed config."""
    return cfg if isinstance(cfg, PromptConfig) else cfg.prompt


@dataclass(frozen=True)
class ExampleInfo:
    """What a prompt was made from: its record's source row, subject and option texts."""

    record: str  # the source row (e.g. "row 12 (id 'x')"), or the record's position
    subject: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class PromptSet:
    """Prompts ready for the probe.

    ``option_ids[i, k]`` is the token read for option k of example i, -1 where example i has
    fewer than K options (ARC questions have 3 to 5). In the cloze format ``prompts`` are the
    contexts, ``requests`` hold every option's continuation tokens and ``option_ids[i, k]`` is
    the first token of option k's continuation (the one the context's last position predicts).
    """

    prompts: list[str]
    labels: np.ndarray  # [N] int64
    option_ids: np.ndarray  # [N, K] int64, -1 padded
    option_strings: list[str]  # the continuation read for each option slot, e.g. " A" or " positive"
    adds_bos: bool  # whether the tokenizer's default adds a BOS token (recorded, not forced)
    requests: tuple[ClozeRequest, ...] | None = None  # cloze only: one per prompt
    cloze_norm: str | None = None  # cloze only: one of CLOZE_NORMS
    # With in-context exemplars: prompts of one group share their exemplars, so a token prefix
    # (calibrate.engine.prefix runs it once per group). None: no shared prefix is claimed.
    groups: tuple[str, ...] | None = None
    style: Mapping[str, Any] | None = None  # the prompt style and exemplar ids (metrics.json)
    # What build_prompts found in the data (repeated records and options, control tokens as
    # text): counts for metrics.json. None: built by hand, nothing checked.
    data_checks: DataChecks | None = None
    # Which record each prompt is: its source row (or position), subject and option texts, for
    # the tidy per-example tables. None: built without records.
    examples: tuple[ExampleInfo, ...] | None = None

    @property
    def is_cloze(self) -> bool:
        """Whether options are scored as continuations (cloze) rather than single tokens."""
        return self.requests is not None

    def subset(self, idx: Sequence[int] | np.ndarray) -> PromptSet:
        """The prompts at ``idx``, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        requests = None if self.requests is None else tuple(self.requests[i] for i in idx)
        groups = None if self.groups is None else tuple(self.groups[i] for i in idx)
        checks = None if self.data_checks is None else self.data_checks.subset(idx)
        examples = None if self.examples is None else tuple(self.examples[i] for i in idx)
        return PromptSet([self.prompts[i] for i in idx], self.labels[idx], self.option_ids[idx],
                         self.option_strings, self.adds_bos, requests, self.cloze_norm, groups,
                         self.style, checks, examples)


def _not_text(what: str, value: Any, accepted: str = "") -> str:
    """The message for a value that should be text and is not."""
    return (f"{what} {one_line(repr(value), 120)} is a {type(value).__name__}; accepted: text "
            f"(a string){' ' + accepted if accepted else ''}")


def check_text_fields(records: Sequence[Any], config: PromptConfig, what: str = "example") -> None:
    """A :class:`PromptError` unless every value a template field is filled with is a string:
    each record's question, subject (else the config's) and options. A list would be rendered
    as its Python repr ("['physics', 'chemistry']")."""
    if not isinstance(config.subject, str):
        raise PromptError(_not_text("dataset.subject", config.subject,
                                    "(the {subject} of records without one)"))
    for index, record in enumerate(records):
        name = example_name(index, record, what)
        for field, value in (("question", record.question), ("subject", record.subject)):
            if not isinstance(value, str):
                raise PromptError(_not_text(f"{name}: {field}", value))
        if isinstance(record.options, str) or not all(isinstance(o, str) for o in record.options):
            raise PromptError(_not_text(f"{name}: an option of", record.options,
                                        "for every option"))


def render_choices(options: Sequence[str]) -> str:
    """``A. first\\nB. second ...`` as in lm-eval's MMLU template."""
    if len(options) > len(LETTERS):
        raise PromptError(f"{len(options)} options; at most {len(LETTERS)} can be lettered")
    return "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))


def render_prompt(template: str, record: Any, default_subject: str = "") -> str:
    """Fill ``{subject}``, ``{question}`` and ``{choices}`` of a template for one record."""
    try:
        return template.format(subject=record.subject or default_subject,
                               question=record.question, choices=render_choices(record.options))
    except (KeyError, IndexError) as err:
        raise PromptError(f"template {template!r} uses unknown placeholder {err}; "
                          "accepted: {subject}, {question}, {choices}") from err


SHOT_DELIMITER = "\n\n"  # lm-eval's fewshot_delimiter: after every exemplar's answer
TARGET_DELIMITER = " "    # lm-eval's target_delimiter: between an exemplar and its answer (cloze)


def split_description(template: str) -> tuple[str, str]:
    """(description, question part) of a template: the description is the text before
    ``{question}`` up to its last blank line (lm-eval's ``description``, said once before the
    exemplars: MMLU's "The following are multiple choice questions ...\n\n"); "" when none."""
    head, found, _ = template.partition("{question}")
    cut = head.rfind(SHOT_DELIMITER) if found else -1
    if cut < 0:
        return "", template
    return template[:cut + len(SHOT_DELIMITER)], template[cut + len(SHOT_DELIMITER):]


def shot_answer(config: PromptConfig, record: Any) -> str:
    """The answer written after an exemplar: its option's continuation (" A", " positive", or
    the target delimiter and the option's text in the cloze format)."""
    if config.answer_format == "cloze":
        return TARGET_DELIMITER + record.options[record.label]
    return option_strings(config.answer_format, len(record.options), config.verbalizer)[record.label]


def render_with_shots(config: PromptConfig, record: Any, shots: Sequence[Any] = ()) -> tuple[str, str]:
    """(description, body) of a record's prompt: the body holds the exemplars, each followed by
    its answer and a blank line, then the question; description + body is lm-eval's k-shot
    rendering, and with no exemplars the template's own rendering."""
    description, question = split_description(config.template)
    shown = "".join(render_prompt(question, s, config.subject) + shot_answer(config, s)
                    + SHOT_DELIMITER for s in shots)
    return (render_prompt(description, record, config.subject),
            shown + render_prompt(question, record, config.subject))


def check_chat_template(tokenizer: Any) -> None:
    """A :class:`PromptError` when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise PromptError(f"prompt.chat_template=true but the tokenizer {name!r} has no chat "
                          "template; accepted: prompt.chat_template=false for this model, or an "
                          "instruct model whose tokenizer defines one (e.g. model=smollm2)")


def render_chat(tokenizer: Any, description: str, body: str) -> str:
    """The chat template around the prompt as lm-eval applies it (exemplars collapsed into one
    user turn, the description as the system turn, dropped where the template refuses a system
    role), ending at the assistant turn's first position. A BOS the template writes is dropped
    from the text when the tokenizer adds it itself, so the prompt's tokens are the template's."""
    import jinja2

    messages = ([{"role": "system", "content": description}] if description else []) + \
        [{"role": "user", "content": body}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except jinja2.exceptions.TemplateError:
        text = tokenizer.apply_chat_template(messages[-1:], tokenize=False,
                                             add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and _adds_bos(tokenizer) and text.startswith(bos):
        text = text[len(bos):]
    return text


def render_all(records: Sequence[Any], config: PromptConfig, tokenizer: Any, style: Any = None,
               exemplars: Any = None) -> list[str]:
    """Every record's prompt in the prompt style (``style``: a
    :class:`~calibrate.tasks.shots.PromptStyle`; None: zero-shot, no chat template)."""
    shots = getattr(style, "shots", 0)
    chat = bool(getattr(style, "chat_template", False))
    if shots and (exemplars is None or exemplars.shots != shots):
        raise PromptError(f"prompt.shots={shots} needs {shots} exemplars per group "
                          f"(calibrate.tasks.shots.load_with_exemplars), got "
                          f"{None if exemplars is None else exemplars.shots}")
    if chat:
        check_chat_template(tokenizer)
    check_text_fields(records, config)
    if shots:
        for subject, shown in _exemplar_groups(exemplars):
            check_text_fields(shown, config, f"{subject} exemplar".lstrip())
    if not shots and not chat:
        return [render_prompt(config.template, r, config.subject) for r in records]
    out = []
    for record in records:
        description, body = render_with_shots(config, record, exemplars.of(record) if shots else ())
        out.append(render_chat(tokenizer, description, body) if chat else description + body)
    return out


def option_strings(answer_format: str, n_options: int, verbalizer: Sequence[str] | None) -> list[str]:
    """The continuation string of each option slot."""
    if answer_format == "letters":
        return [f" {LETTERS[k]}" for k in range(n_options)]
    if answer_format == "verbalizer":
        if not verbalizer or len(verbalizer) != n_options:
            raise PromptError(f"verbalizer {list(verbalizer or [])} must give one word for each of "
                              f"the {n_options} options")
        return list(verbalizer)
    raise PromptError(f"answer_format={answer_format!r}; accepted: {', '.join(ANSWER_FORMATS)}")


def single_token_id(tokenizer: Any, text: str, contexts: Sequence[str]) -> int:
    """The one token of ``text`` as it follows each context; error if it is not exactly one."""
    alone = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(alone) != 1:
        pieces = tokenizer.convert_ids_to_tokens(alone)
        raise PromptError(f"answer option {text!r} is not a single token for this tokenizer: "
                          f"{pieces} (ids {alone}); choose options that are one token each")
    for context in contexts:
        base = tokenizer(context, add_special_tokens=False)["input_ids"]
        full = tokenizer(context + text, add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or full[len(base):] != alone:
            raise PromptError(f"answer option {text!r} merges with the end of the prompt "
                              f"{context[-40:]!r}: it is not one separate token there")
    return alone[0]


def _adds_bos(tokenizer: Any) -> bool:
    probe_ids = tokenizer("x")["input_ids"]
    return bool(tokenizer.bos_token_id is not None and probe_ids[0] == tokenizer.bos_token_id)


def build_cloze_prompts(records: Sequence[Any], contexts: list[str],
                        dataset_cfg: PromptConfig | DatasetConfig,
                        tokenizer: Any, chat: bool = False) -> PromptSet:
    """Cloze prompts: each option's text is a continuation of the rendered context (lm-eval's
    split: the context's trailing whitespace joins the continuation, which starts with a space).
    ``chat``: contexts end at the assistant turn's first position, where the option's text
    itself starts (no delimiter, nothing moved)."""
    norm = as_prompt_config(dataset_cfg).cloze_norm
    if norm not in CLOZE_NORMS:
        raise PromptError(f"cloze_norm={norm!r}; accepted: {', '.join(CLOZE_NORMS)}")
    try:
        requests = build_requests(tokenizer, contexts, [r.options for r in records],
                                  **({"delimiter": "", "move_whitespace": False} if chat else {}))
    except ValueError as err:
        raise PromptError(str(err)) from err
    width = max(r.n_options for r in requests)
    option_ids = np.full((len(records), width), -1, dtype=np.int64)
    for i, req in enumerate(requests):
        option_ids[i, :req.n_options] = [c[0] for c in req.continuations]
    labels = np.array([r.label for r in records], dtype=np.int64)
    return PromptSet(contexts, labels, option_ids, [], _adds_bos(tokenizer), tuple(requests), norm)


def _check_max_length(max_length: Any) -> int | None:
    if max_length is None:
        return None
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) \
            or max_length < 1:
        raise PromptError(f"max_length={max_length!r} is invalid; accepted: None or the model's "
                          "context length as an integer >= 1")
    return int(max_length)


def _check_chars_per_token(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not value > 0:
        raise PromptError(f"checks.max_chars_per_token={value!r} is invalid; accepted: a number "
                          "> 0 (characters per token a prompt may average), or None: no check")
    return float(value)


def _refuse_too_long(lengths: Sequence[int], max_length: int, what: str,
                     records: Sequence[Any] = ()) -> None:
    """PromptError naming the first example whose token length exceeds ``max_length``."""
    for index, length in enumerate(lengths):
        if length > max_length:
            longest = max(lengths)
            over = sum(n > max_length for n in lengths)
            name = example_name(index, records[index] if records else None)
            raise PromptError(f"{name} is {length} tokens ({what}), more than the model's "
                              f"context of max_length={max_length} tokens ({over} example(s) are, "
                              f"the longest {longest}); accepted: prompts of at most {max_length} "
                              "tokens (shorten the template or drop those examples)")


def _refuse_too_many_chars(lengths: Sequence[int], records: Sequence[Any], max_length: int,
                           chars_per_token: float, what: str) -> None:
    """PromptError naming the first example longer in characters than the model's context could
    hold at ``chars_per_token`` characters a token: checked before anything is tokenized."""
    limit = int(max_length * chars_per_token)
    over = [i for i, n in enumerate(lengths) if n > limit]
    if over:
        first = over[0]
        raise PromptError(f"{example_name(first, records[first])} is {lengths[first]} characters "
                          f"({what}), more than max_length={max_length} tokens x "
                          f"checks.max_chars_per_token={chars_per_token:g} = {limit} characters "
                          f"({len(over)} example(s) are, the longest {max(lengths)}); accepted: "
                          f"prompts of at most {limit} characters (refused before tokenizing)")


def _ending(prompt: str) -> str:
    """The end of a prompt an option token could merge with: its last line (its last characters
    when that line is empty, as at a chat template's assistant turn)."""
    last = prompt.rsplit("\n", 1)[-1]
    return last if last.strip() else prompt[-16:]


def _styled(prompt_set: PromptSet, records: Sequence[Any], style: Any,
            exemplars: Any) -> PromptSet:
    """The prompt set with its style recorded and, with exemplars, its prefix groups."""
    if style is None:
        return prompt_set
    info: dict[str, Any] = {"shots": int(style.shots), "chat_template": bool(style.chat_template)}
    groups = None
    if style.shots:
        info.update(exemplars.summary())
        groups = tuple(exemplars.group(r) for r in records)
    return replace(prompt_set, groups=groups, style=info)


# ---------------------------------------------------------------- data checks

def _exemplar_groups(exemplars: Any) -> list[tuple[str, Sequence[Any]]]:
    """(subject, its exemplars) of each group of exemplars ("": every record's)."""
    return [] if exemplars is None else list(exemplars.by_subject.items())


def _merge_cloze_options(records: Sequence[Any], fmt: str) -> tuple[list[Any], DataChecks]:
    """Rows listing an option text twice: merged into one option in the cloze format (identical
    continuations score identically and the argmax takes the first copy, so an answer on a later
    copy could never be right); counted in the others (letters tell the copies apart)."""
    rows = [i for i, r in enumerate(records) if repeated_options(r.options)]
    if not rows:
        return list(records), DataChecks()
    on_copy = [i for i in rows if records[i].label in repeated_options(records[i].options)]
    merge = fmt == "cloze"
    out = [merge_repeated_options(r) for r in records] if merge else list(records)
    merged = sum(len(a.options) - len(b.options) for a, b in zip(records, out))
    action = {"cloze": f"merged into one option each ({merged} copies dropped)",
              "letters": "kept: letters tell the copies apart"}.get(
                  fmt, "kept: each slot is read by its own verbalizer word")
    LOG.warning("%d row(s) list an option text more than once (%s), %d with the answer on a "
                "later copy; %s", len(rows), first_examples(rows, records), len(on_copy), action)
    return out, DataChecks(repeated_option_rows=len(rows), answer_on_repeat=len(on_copy),
                           merged_options=merged)


def _duplicates(records: Sequence[Any]) -> tuple[tuple[tuple[int, ...], ...], int]:
    """Groups of records repeating an earlier one's question and options (warned with counts)."""
    groups = duplicate_records(records)
    conflicts = conflicting_groups(records, groups)
    if groups:
        LOG.warning("%d record(s) repeat an earlier record's question and options (%d group(s), "
                    "%d disagreeing on the answer; first: %s); each copy is scored, and a "
                    "steering job's calibration and evaluation splits may share one",
                    sum(len(g) - 1 for g in groups), len(groups), conflicts,
                    first_examples([g[1] for g in groups], records))
    return groups, conflicts


def _control_text(records: Sequence[Any], exemplars: Any, tokenizer: Any, chat: bool) -> int:
    """Rows whose data text holds the tokenizer's control tokens. With the chat template they
    would open or close turns: a :class:`PromptError` naming them. Plain prompts are tokenized
    as lm-eval tokenizes them (the token is read as a control token there too): a warning."""
    find = control_token_finder(tokenizer)
    hits = {i: found for i, r in enumerate(records)
            if (found := sorted({t for text in record_texts(r) for t in find(text)}))}
    shots = [(example_name(k, r, f"{subject} exemplar".lstrip()), found)
             for subject, shown in _exemplar_groups(exemplars) for k, r in enumerate(shown)
             if (found := sorted({t for text in record_texts(r) for t in find(text)}))]
    if not hits and not shots:
        return 0
    tokens = sorted({t for found in [*hits.values(), *(f for _, f in shots)] for t in found})
    named = first_examples(list(hits), records) if hits else ""
    named = ", ".join(filter(None, [named, *(n for n, _ in shots[:3])]))
    count = len(hits) + len(shots)
    if chat:
        raise PromptError(f"{count} row(s) hold the tokenizer's control tokens {tokens} as text "
                          f"({named}); with prompt.chat_template=true they would open or close "
                          "chat turns; accepted: data text without them (remove those rows or "
                          "the tokens from them)")
    LOG.warning("%d row(s) hold the tokenizer's control tokens %s as text (%s); they are "
                "tokenized as control tokens, as lm-eval tokenizes these prompts", count, tokens,
                named)
    return count


def _blank(record: Any) -> Any:
    """The record with every data text emptied (its option count kept)."""
    return with_fields(record, question="", subject="", options=tuple("" for _ in record.options),
                       label=0)


def _check_chat_control_ids(ids: Sequence[Sequence[int]], records: Sequence[Any],
                            config: PromptConfig, tokenizer: Any, style: Any,
                            exemplars: Any) -> None:
    """Every chat prompt's control tokens are exactly those of the same prompt with every data
    text empty (the chat template's and the dataset template's own): the net under the text
    check, for a control token formed where data text meets template text."""
    # <unk> stands for ordinary text a vocabulary lacks: it opens and closes nothing
    control = set(control_tokens(tokenizer).values()) - {getattr(tokenizer, "unk_token_id", None)}
    shots = exemplars.of(records[0]) if getattr(style, "shots", 0) else ()
    description, body = render_with_shots(config, _blank(records[0]), [_blank(s) for s in shots])
    skeleton = render_chat(tokenizer, description, body)
    expected = [t for t in tokenizer(skeleton)["input_ids"] if t in control]
    bad = [i for i, row in enumerate(ids) if [t for t in row if t in control] != expected]
    if bad:
        got = Counter(t for t in ids[bad[0]] if t in control)
        names = tokenizer.convert_ids_to_tokens(sorted((got - Counter(expected))
                                                       or (Counter(expected) - got)))
        raise PromptError(f"{len(bad)} chat prompt(s) hold control tokens the chat template does "
                          f"not put there ({first_examples(bad, records)}; tokens {names}): their "
                          "data text forms them with the text around it; accepted: data text "
                          "that does not form the tokenizer's control tokens")


def build_prompts(records: Sequence[Any],
                  dataset_cfg: PromptConfig | DatasetConfig, tokenizer: Any,
                  *, max_length: int | None = None, max_chars_per_token: float | None = None,
                  style: Any = None, exemplars: Any = None) -> PromptSet:
    """Render every record and resolve each option slot to a single token id (letters,
    verbalizer) or to its continuation tokens (cloze).

    ``max_length`` (the model's context length in tokens) refuses, with a :class:`PromptError`
    naming the example, any prompt longer than it: the prompt with the tokenizer's default
    special tokens (letters, verbalizer), or the context plus its longest continuation (cloze).
    With ``max_chars_per_token`` (``checks.max_chars_per_token``) too, a prompt longer in
    characters than ``max_length * max_chars_per_token`` is refused before anything is
    tokenized. ``dataset_cfg`` is a :class:`PromptConfig` or a checked
    :class:`~calibrate.tasks.dataset_config.DatasetConfig`.
    ``style`` (a :class:`~calibrate.tasks.shots.PromptStyle`) adds in-context ``exemplars``
    (:class:`~calibrate.tasks.shots.Exemplars`) and the tokenizer's chat template; with the chat
    template the answer is read at the assistant turn's first position, options without their
    leading space ("A", not " A").

    The data is checked first (:mod:`calibrate.tasks.quality`): every template field is text;
    with the chat template no row may hold the tokenizer's control tokens as text (plain
    prompts: a warning); rows listing an option text twice are merged (cloze) or counted;
    repeated records are counted. The counts are ``data_checks`` of the returned set.
    """
    max_length = _check_max_length(max_length)
    chars_per_token = _check_chars_per_token(max_chars_per_token)
    config = as_prompt_config(dataset_cfg)
    if not records:
        raise PromptError(f"dataset {config.name!r} has no records")
    fmt = config.answer_format
    chat = bool(getattr(style, "chat_template", False))
    check_text_fields(records, config)
    records, checks = _merge_cloze_options(records, fmt)
    prompts = render_all(records, config, tokenizer, style, exemplars)
    if max_length is not None and chars_per_token is not None:
        chars = ([len(p) + max(map(len, r.options)) for p, r in zip(prompts, records)]
                 if fmt == "cloze" else [len(p) for p in prompts])
        _refuse_too_many_chars(chars, records, max_length, chars_per_token,
                               "context + longest option" if fmt == "cloze" else "prompt")
    groups, conflicts = _duplicates(records)
    checks = replace(checks, duplicate_groups=groups, conflicting_groups=conflicts,
                     control_token_rows=_control_text(records, exemplars, tokenizer, chat))
    if fmt == "cloze":
        prompt_set = build_cloze_prompts(records, prompts, config, tokenizer, chat)
        if chat:
            _check_chat_control_ids([r.context_ids + [t for c in r.continuations for t in c]
                                     for r in prompt_set.requests], records, config, tokenizer,
                                    style, exemplars)
        if max_length is not None:
            lengths = [len(r.context_ids) + max(len(c) for c in r.continuations)
                       for r in prompt_set.requests]
            _refuse_too_long(lengths, max_length, "context + longest continuation", records)
        return replace(_styled(prompt_set, records, style, exemplars), data_checks=checks,
                       examples=_examples(records, config))
    if max_length is not None or chat:
        prompt_ids = tokenizer(prompts)["input_ids"]
        if chat:
            _check_chat_control_ids(prompt_ids, records, config, tokenizer, style, exemplars)
        if max_length is not None:
            _refuse_too_long([len(i) for i in prompt_ids], max_length, "prompt", records)
    width = max(len(r.options) for r in records)
    strings = option_strings(fmt, width, config.verbalizer)
    if chat:  # the assistant turn's first token: "A", not " A"
        strings = [s.lstrip() for s in strings]
    # Merges at the boundary depend only on the prompt's end, shared by all prompts of a template.
    endings = sorted({_ending(p) for p in prompts})
    ids = [single_token_id(tokenizer, s, endings) for s in strings]
    if len(set(ids)) != len(ids):
        raise PromptError(f"answer options {strings} map to repeated token ids {ids}")
    option_ids = np.full((len(records), width), -1, dtype=np.int64)
    for i, record in enumerate(records):
        option_ids[i, : len(record.options)] = ids[: len(record.options)]
    labels = np.array([r.label for r in records], dtype=np.int64)
    prompt_set = PromptSet(prompts, labels, option_ids, strings, _adds_bos(tokenizer),
                           data_checks=checks, examples=_examples(records, config))
    return _styled(prompt_set, records, style, exemplars)


def _examples(records: Sequence[Any], config: PromptConfig) -> tuple[ExampleInfo, ...]:
    return tuple(ExampleInfo(getattr(r, "origin", "") or str(i),
                             getattr(r, "subject", "") or config.subject, tuple(r.options))
                 for i, r in enumerate(records))
