"""Scoring dispatch: cloze prompt sets go through the cloze path, unsteered and steered.

References: ``run_cloze`` called directly; the model's own log-likelihoods (``model(...)``,
its own head) of each context + option run alone from scratch, with the steering edit added by
a hook at the last context position (or every context position) -- no key/value cache, no
shared states; the letter probe for letter prompt sets.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from references import loglik_reference

from calibrate.engine.cloze import run_cloze
from calibrate.engine.edits import Steering
from calibrate.engine.hooks import edit_residual
from calibrate.engine.probe import ProbeSettings, run_probe
from calibrate.engine.scoring import score, score_steered
from calibrate.tasks.continuations import cloze_divisors
from calibrate.tasks.data import MCRecord
from calibrate.tasks.prompts import PromptConfig, build_prompts

RECORDS = [MCRecord("the movie was great ?", ("very good fun", "bad", "not very good ."), 0),
           MCRecord("is this a film ?", ("yes", "no no"), 1),
           MCRecord("a very boring film . good or bad ?", ("good", "very bad", "very good", "bad"), 1)]
CLOZE = PromptConfig(name="toy", answer_format="cloze", cloze_norm="token",
                     template="question : {question} answer :")
LETTERS = PromptConfig(name="toy", answer_format="letters", template="{question}\n{choices}\nanswer :")


def quiet(**kwargs) -> ProbeSettings:
    return ProbeSettings(progress=False, **kwargs)


def test_cloze_prompt_set_is_scored_by_cloze(tiny):
    prompts = build_prompts(RECORDS, CLOZE, tiny.tokenizer)
    assert prompts.is_cloze and prompts.cloze_norm == "token"
    result = score(tiny, prompts, quiet().keeping((1,)))
    direct = run_cloze(tiny, list(prompts.requests), prompts.labels, quiet(), "token", (1,))
    np.testing.assert_array_equal(result.option_logits, direct.option_logits)
    np.testing.assert_array_equal(result.residuals[1], direct.residuals[1])
    divisors = cloze_divisors(prompts.requests, "token")
    for i, request in enumerate(prompts.requests):
        k = request.n_options
        np.testing.assert_allclose(result.option_logits[i, -1, :k],
                                   loglik_reference(tiny, request) / divisors[i, :k], atol=1e-4)


def test_letter_prompt_set_is_scored_by_the_probe(tiny):
    prompts = build_prompts(RECORDS, LETTERS, tiny.tokenizer)
    assert not prompts.is_cloze
    np.testing.assert_array_equal(score(tiny, prompts, quiet()).option_logits,
                                  run_probe(tiny, prompts, quiet()).option_logits)


def steered_reference(loaded, request, vector: np.ndarray, eta: float, layers: tuple[int, ...],
                      position: str) -> np.ndarray:
    """[K] the model's own log-likelihood of each option, each context + option run alone, with
    eta * vector added at ``layers`` to the last context position (or all context positions)."""
    n = len(request.context_ids)
    shift = torch.as_tensor(eta * vector, dtype=torch.float32)

    def edit(_layer: int, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        hidden[:, (n - 1 if position == "last" else 0):n] += shift
        return hidden

    out = []
    with torch.inference_mode(), edit_residual(loaded.adapter, list(layers), edit):
        for cont in request.continuations:
            ids = torch.tensor([request.context_ids + cont])
            logp = torch.log_softmax(loaded.model(input_ids=ids).logits[0, n - 1:-1].double(), -1)
            out.append(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()))
    return np.array(out)


@pytest.mark.parametrize("position", ["last", "all"])
def test_steered_cloze_equals_steering_each_option_from_scratch(tiny, position):
    prompts = build_prompts(RECORDS, replace(CLOZE, cloze_norm="none"), tiny.tokenizer)
    hidden = tiny.adapter.unembed_weight.shape[1]
    vector = np.random.default_rng(0).standard_normal(hidden).astype(np.float32)
    vector /= np.linalg.norm(vector)
    layers = (0, tiny.adapter.num_blocks - 1)
    steering = Steering(vector, layers, (0.0, 3.0), position)
    scores = score_steered(tiny, prompts, steering, quiet(batch_size=2))
    assert scores.shape == (2, 3, tiny.adapter.num_blocks + 1, 4)
    plain = score(tiny, prompts, quiet())
    np.testing.assert_allclose(scores[0], plain.option_logits, atol=1e-5)  # eta 0 changes nothing
    moved = False
    for i, request in enumerate(prompts.requests):
        k = request.n_options
        expected = steered_reference(tiny, request, vector, 3.0, layers, position)
        np.testing.assert_allclose(scores[1, i, -1, :k], expected, atol=1e-4)
        moved |= not np.allclose(expected, plain.option_logits[i, -1, :k], atol=1e-3)
    assert moved  # the edit reaches the option scores


def test_steered_cloze_applies_the_norm(tiny):
    prompts = build_prompts(RECORDS, CLOZE, tiny.tokenizer)  # per-token norm
    raw = build_prompts(RECORDS, replace(CLOZE, cloze_norm="none"), tiny.tokenizer)
    steering = Steering(np.ones(tiny.adapter.unembed_weight.shape[1], np.float32), (1,), (0.0, 1.0))
    normed = score_steered(tiny, prompts, steering, quiet())
    summed = score_steered(tiny, raw, steering, quiet())
    divisors = cloze_divisors(prompts.requests, "token")
    np.testing.assert_allclose(normed, summed / divisors[None, :, None, :])
