"""Cloze requests: the context and each option's continuation as token ids, split as lm-eval does.

Pure tokenization and length normalization, no model: :mod:`calibrate.tasks.prompts` builds the
requests before any weights are read, :mod:`calibrate.engine.cloze` scores them at every layer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# none: the summed log-likelihood (lm-eval's acc); token: per continuation token; char: per
# character of the option text (lm-eval's acc_norm); byte: per UTF-8 byte of the option text
CLOZE_NORMS = ("none", "token", "char", "byte")


@dataclass(frozen=True)
class ClozeRequest:
    """One example: the context's token ids and each option's continuation token ids."""

    context_ids: list[int]
    continuations: list[list[int]]  # one per option, each non-empty
    option_texts: tuple[str, ...] = ()  # the options as given (char / byte normalization)

    @property
    def n_options(self) -> int:
        """Number of options K of this example."""
        return len(self.continuations)


def split_context(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's rule: trailing whitespace of the context moves to the front of the continuation."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def _prefix_token(tokenizer: Any) -> int:
    """lm-eval's token for an empty context: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def build_requests(tokenizer: Any, contexts: Sequence[str], options: Sequence[Sequence[str]],
                   delimiter: str = " ", move_whitespace: bool = True) -> list[ClozeRequest]:
    """Tokenize like lm-eval: continuation = encode(context + cont)[len(encode(context)):].

    ``tokenizer`` is a tokenizer or anything with a ``tokenizer`` attribute (a loaded model).
    The split is computed without special tokens; the context itself keeps the tokenizer's
    default special tokens (BOS or not), as the letter probe does. An empty context becomes the
    BOS (else EOS) token. A continuation with no tokens raises ``ValueError``.
    ``move_whitespace=False`` keeps the context whole (a chat template's assistant turn ends in
    a newline that belongs to the turn, not to the answer).
    """
    if len(contexts) != len(options):
        raise ValueError(f"{len(contexts)} contexts but {len(options)} option lists")
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    for context, opts in zip(contexts, options):
        if not opts:
            raise ValueError(f"context {context[-60:]!r} has no options")
    split = [[split_context(c, delimiter + o) if move_whitespace else (c, delimiter + o)
              for o in opts] for c, opts in zip(contexts, options)]
    bare = [pairs[0][0] for pairs in split]
    plain = tok(bare, add_special_tokens=False)["input_ids"]
    default = tok(bare)["input_ids"]
    wholes = tok([c + cont for pairs in split for c, cont in pairs],
                 add_special_tokens=False)["input_ids"]
    requests, at = [], 0
    for i, pairs in enumerate(split):
        conts = [w[len(plain[i]):] for w in wholes[at:at + len(pairs)]]
        at += len(pairs)
        for option, ids in zip(options[i], conts):
            if not ids:
                raise ValueError(f"option {option!r} of example {i} has no continuation tokens "
                                 f"after the context {bare[i][-40:]!r}; options must be "
                                 "non-empty text")
        context_ids = list(default[i]) if bare[i] else [_prefix_token(tok)]
        requests.append(ClozeRequest(context_ids, [list(c) for c in conts], tuple(options[i])))
    return requests


def cloze_divisors(requests: Sequence[ClozeRequest], norm: str) -> np.ndarray:
    """[N, K] float64 divisor of each option's log-likelihood (1 where an example has no option k).

    ``none``: 1; ``token``: the continuation's token count; ``char``: the option text's length
    in characters (lm-eval's acc_norm divides by ``len(choice)``); ``byte``: its UTF-8 bytes.
    """
    if norm not in CLOZE_NORMS:
        raise ValueError(f"cloze_norm={norm!r}; accepted: {', '.join(CLOZE_NORMS)}")
    k = max(r.n_options for r in requests)
    out = np.ones((len(requests), k), dtype=np.float64)
    for i, req in enumerate(requests):
        if norm == "token":
            out[i, :req.n_options] = [len(c) for c in req.continuations]
        elif norm in ("char", "byte"):
            if len(req.option_texts) != req.n_options:
                raise ValueError(f"cloze_norm={norm} needs the text of each of the "
                                 f"{req.n_options} options of example {i}; got "
                                 f"{len(req.option_texts)}")
            lengths = [len(t) if norm == "char" else len(t.encode("utf-8"))
                       for t in req.option_texts]
            if min(lengths) <= 0:
                raise ValueError(f"cloze_norm={norm}: example {i} has an empty option text "
                                 f"{list(req.option_texts)}")
            out[i, :req.n_options] = lengths
    return out


def requests_digest(requests: Sequence[ClozeRequest]) -> str:
    """sha256 of every request's token ids and option texts (a cache key part)."""
    digest = hashlib.sha256()
    for req in requests:
        digest.update(json.dumps([req.context_ids, req.continuations, req.option_texts]).encode())
    return digest.hexdigest()
