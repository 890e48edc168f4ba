"""Prompts and answer tokens: records -> template strings, options -> one token id each."""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from calibrate.tasks.continuations import CLOZE_NORMS, ClozeRequest, build_requests

if TYPE_CHECKING:
    from calibrate.tasks.dataset_config import DatasetConfig

ANSWER_FORMATS = ("letters", "verbalizer", "cloze")
TEMPLATE_FIELDS = ("subject", "question", "choices")  # the placeholders render_prompt fills
LETTERS = string.ascii_uppercase


class PromptError(ValueError):
    """A template or an answer option cannot be used with this tokenizer."""


@dataclass(frozen=True)
class PromptConfig:
    """What rendering and answer tokens need of a dataset config, typed.

    :class:`~calibrate.tasks.dataset_config.DatasetConfig` gives one (``.prompt``) after its
    checks; :meth:`from_mapping` reads these keys of a plain or partial mapping as given (no
    dataset checks: :func:`build_prompts` raises :class:`PromptError` on bad values itself).
    """

    name: Any                                 # for messages only
    answer_format: str                        # one of ANSWER_FORMATS (checked on use)
    template: str
    subject: str = ""                         # the {subject} of records without one
    verbalizer: Sequence[str] | None = None   # verbalizer only: one word per option slot
    cloze_norm: str = "none"                  # cloze only: one of CLOZE_NORMS (checked on use)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> PromptConfig:
        """The prompt keys of a dataset config mapping (a dict or an OmegaConf node)."""
        words = cfg.get("verbalizer")
        if isinstance(words, Sequence) and not isinstance(words, str):
            words = tuple(words)
        return cls(name=cfg.get("name"), answer_format=str(cfg.get("answer_format")),
                   template=str(cfg["template"]), subject=str(cfg.get("subject") or ""),
                   verbalizer=words, cloze_norm=str(cfg.get("cloze_norm") or "none"))


def as_prompt_config(cfg: PromptConfig | DatasetConfig | Mapping[str, Any]) -> PromptConfig:
    """A :class:`PromptConfig` from either typed config, or from a mapping (read once)."""
    from calibrate.tasks.dataset_config import DatasetConfig

    if isinstance(cfg, PromptConfig):
        return cfg
    if isinstance(cfg, DatasetConfig):
        return cfg.prompt
    return PromptConfig.from_mapping(cfg)


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

    @property
    def is_cloze(self) -> bool:
        """Whether options are scored as continuations (cloze) rather than single tokens."""
        return self.requests is not None

    @property
    def scoring(self) -> Any:
        """How these prompts are scored (:mod:`calibrate.engine.scoring`), decided by how they
        were built: continuations (cloze) or one token per option."""
        from calibrate.engine.scoring import CLOZE, SINGLE_TOKEN

        return CLOZE if self.is_cloze else SINGLE_TOKEN

    def subset(self, idx: Sequence[int] | np.ndarray) -> PromptSet:
        """The prompts at ``idx``, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        requests = None if self.requests is None else tuple(self.requests[i] for i in idx)
        return PromptSet([self.prompts[i] for i in idx], self.labels[idx], self.option_ids[idx],
                         self.option_strings, self.adds_bos, requests, self.cloze_norm)


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
                        dataset_cfg: PromptConfig | DatasetConfig | Mapping[str, Any],
                        tokenizer: Any) -> PromptSet:
    """Cloze prompts: each option's text is a continuation of the rendered context (lm-eval's
    split: the context's trailing whitespace joins the continuation, which starts with a space)."""
    norm = as_prompt_config(dataset_cfg).cloze_norm
    if norm not in CLOZE_NORMS:
        raise PromptError(f"cloze_norm={norm!r}; accepted: {', '.join(CLOZE_NORMS)}")
    try:
        requests = build_requests(tokenizer, contexts, [r.options for r in records])
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


def _refuse_too_long(lengths: Sequence[int], max_length: int, what: str) -> None:
    """PromptError naming the first example whose token length exceeds ``max_length``."""
    for index, length in enumerate(lengths):
        if length > max_length:
            longest = max(lengths)
            over = sum(n > max_length for n in lengths)
            raise PromptError(f"example {index} is {length} tokens ({what}), more than the model's "
                              f"context of max_length={max_length} tokens ({over} example(s) are, "
                              f"the longest {longest}); accepted: prompts of at most {max_length} "
                              "tokens (shorten the template or drop those examples)")


def build_prompts(records: Sequence[Any],
                  dataset_cfg: PromptConfig | DatasetConfig | Mapping[str, Any], tokenizer: Any,
                  *, max_length: int | None = None) -> PromptSet:
    """Render every record and resolve each option slot to a single token id (letters,
    verbalizer) or to its continuation tokens (cloze).

    ``max_length`` (the model's context length in tokens) refuses, with a :class:`PromptError`
    naming the example, any prompt longer than it: the prompt with the tokenizer's default
    special tokens (letters, verbalizer), or the context plus its longest continuation (cloze).
    ``dataset_cfg`` is a :class:`PromptConfig`, a checked
    :class:`~calibrate.tasks.dataset_config.DatasetConfig` or a mapping of their keys.
    """
    max_length = _check_max_length(max_length)
    config = as_prompt_config(dataset_cfg)
    if not records:
        raise PromptError(f"dataset {config.name!r} has no records")
    fmt = config.answer_format
    prompts = [render_prompt(config.template, r, config.subject) for r in records]
    if fmt == "cloze":
        prompt_set = build_cloze_prompts(records, prompts, config, tokenizer)
        if max_length is not None:
            lengths = [len(r.context_ids) + max(len(c) for c in r.continuations)
                       for r in prompt_set.requests]
            _refuse_too_long(lengths, max_length, "context + longest continuation")
        return prompt_set
    if max_length is not None:
        lengths = [len(i) for i in tokenizer(prompts)["input_ids"]]
        _refuse_too_long(lengths, max_length, "prompt")
    width = max(len(r.options) for r in records)
    strings = option_strings(fmt, width, config.verbalizer)
    # Merges at the boundary depend only on the prompt's end, shared by all prompts of a template.
    endings = sorted({p.rsplit("\n", 1)[-1] for p in prompts})
    ids = [single_token_id(tokenizer, s, endings) for s in strings]
    if len(set(ids)) != len(ids):
        raise PromptError(f"answer options {strings} map to repeated token ids {ids}")
    option_ids = np.full((len(records), width), -1, dtype=np.int64)
    for i, record in enumerate(records):
        option_ids[i, : len(record.options)] = ids[: len(record.options)]
    labels = np.array([r.label for r in records], dtype=np.int64)
    return PromptSet(prompts, labels, option_ids, strings, _adds_bos(tokenizer))
