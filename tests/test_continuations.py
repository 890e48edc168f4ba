"""Cloze requests without a model: lm-eval's context/continuation split, the normalization
divisors against hand-counted lengths, and the cache digest."""

from __future__ import annotations

import pytest

from calibrate.tasks.continuations import (
    ClozeRequest,
    build_requests,
    cloze_divisors,
    requests_digest,
    split_context,
)


def test_trailing_whitespace_moves_into_the_continuation():
    assert split_context("Answer:", " yes") == ("Answer:", " yes")
    assert split_context("Answer: ", " yes") == ("Answer:", "  yes")
    assert split_context("Answer:\n", " yes") == ("Answer:", "\n yes")


def test_divisors_count_tokens_characters_and_bytes(word_tokenizer):
    requests = build_requests(word_tokenizer, ["question :", "answer :"],
                              [["caf\u00e9 good", "no"], ["very good fun", "bad", "yes"]])
    assert [len(c) for c in requests[0].continuations] == [2, 1]  # "café" is one <unk> word
    assert cloze_divisors(requests, "none").tolist() == [[1, 1, 1], [1, 1, 1]]
    assert cloze_divisors(requests, "token").tolist() == [[2, 1, 1], [3, 1, 1]]
    # lm-eval's acc_norm: len(option), without the leading space; e-acute is 2 UTF-8 bytes
    assert cloze_divisors(requests, "char").tolist() == [[9, 2, 1], [13, 3, 3]]
    assert cloze_divisors(requests, "byte").tolist() == [[10, 2, 1], [13, 3, 3]]
    with pytest.raises(ValueError, match="cloze_norm='chars'; accepted: none, token, char, byte"):
        cloze_divisors(requests, "chars")
    with pytest.raises(ValueError, match="needs the text of each of the 2 options of example 0"):
        cloze_divisors([ClozeRequest([1], [[2], [3]])], "char")


def test_digest_changes_with_tokens_and_texts():
    base = [ClozeRequest([1, 5], [[2], [3, 4]], ("a", "b c"))]
    digest = requests_digest(base)
    assert requests_digest([ClozeRequest([1, 5], [[2], [3, 4]], ("a", "b c"))]) == digest
    assert requests_digest([ClozeRequest([1, 6], [[2], [3, 4]], ("a", "b c"))]) != digest
    assert requests_digest([ClozeRequest([1, 5], [[2], [3]], ("a", "b c"))]) != digest
    assert requests_digest([ClozeRequest([1, 5], [[2], [3, 4]], ("a", "b d"))]) != digest
    assert requests_digest(base * 2) != digest
