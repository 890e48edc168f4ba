"""Shared-prefix reuse (calibrate/engine/prefix.py): equal to from-scratch k-shot prompts at
every layer, on every tiny architecture, on sliding-window models and on the real SmolLM2 and
Gemma-3-270M: the letter probe, steering at the last position (the edited last token after a
masked gap) and cloze scoring, unsteered and steered.

Tolerance (float32 weights): option logits within atol 2e-3 + rtol 1e-4, probabilities within
atol 1e-4 at every layer; measured on SmolLM2 5-shot MMLU: 2.3e-5 (logits) and 3.2e-6 (probs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny, typed

from calibrate.core.option_scores import option_probabilities
from calibrate.engine.cloze import run_cloze, run_cloze_steered
from calibrate.engine.edits import DirectionSweep, Steering
from calibrate.engine.prefix import (
    SharedPrefix,
    common_prefix_length,
    gaps_reach_window,
    plan_prefixes,
    right_pad_suffixes,
    sliding_window,
)
from calibrate.engine.probe import ProbeSettings, run_probe
from calibrate.engine.steer import run_steered
from calibrate.tasks.continuations import build_requests
from calibrate.tasks.prompts import PromptConfig, build_prompts
from calibrate.tasks.records import MCRecord
from calibrate.tasks.shots import Exemplars, PromptStyle

LOGIT_ATOL, LOGIT_RTOL, PROB_ATOL = 2e-3, 1e-4, 1e-4
LETTERS = PromptConfig(name="toy", answer_format="letters", verbalizer=None,
                       template="question : {question}\n{choices}\nanswer :")


def _settings(reuse: bool, keep_layers=(), **kw) -> ProbeSettings:
    settings = ProbeSettings(progress=False, option_mass="all", prefix_reuse=reuse, **kw)
    return settings.keeping(keep_layers) if keep_layers else settings


def _assert_equal_at_every_layer(shared, scratch) -> None:
    assert shared.option_logits.shape == scratch.option_logits.shape
    np.testing.assert_allclose(shared.option_logits, scratch.option_logits, atol=LOGIT_ATOL,
                               rtol=LOGIT_RTOL)
    np.testing.assert_allclose(shared.probs, scratch.probs, atol=PROB_ATOL, rtol=0)
    np.testing.assert_allclose(shared.option_mass, scratch.option_mass, atol=PROB_ATOL, rtol=0)
    assert (shared.labels == scratch.labels).all()


def _toy_prompts(tokenizer, n: int = 7):
    words = "the movie was great terrible boring fun film good bad very not".split()
    rng = np.random.default_rng(0)

    def sentence(length):
        return " ".join(rng.choice(words, length))

    records = [MCRecord(sentence(int(rng.integers(1, 9))), ("yes", "no", "it"), i % 3,
                        subject=("a", "b")[i % 2]) for i in range(n)]
    shots = {s: tuple(MCRecord(sentence(6), ("yes", "no", "it"), j % 3) for j in range(3))
             for s in ("a", "b")}
    exemplars = Exemplars(shots, (), "by hand", 0, 3)
    return build_prompts(records, LETTERS, tokenizer, style=PromptStyle(3), exemplars=exemplars)


def test_common_prefix_and_plan():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    plan = plan_prefixes([[1, 2, 3, 4], [1, 2, 3, 5, 6], [7, 8], [1, 2, 3]], ["x", "x", "y", "x"])
    # group x shares [1, 2, 3] but its shortest prompt needs one token of its own
    assert [(p, m.tolist()) for p, m in plan] == [([1, 2], [0, 1, 3]), ([7], [2])]
    assert plan_prefixes([[5], [5]], ["g", "g"])[0][0] == []  # nothing left to share: full pass


def test_suffixes_are_right_padded_at_contiguous_positions():
    ids, mask, positions, last = right_pad_suffixes([[4, 5, 6], [7]], pad_id=0, prefix_length=2)
    assert ids.tolist() == [[4, 5, 6], [7, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert positions.tolist() == [[2, 3, 4], [2, 3, 4]] and last.tolist() == [2, 0]


def test_reuse_equals_from_scratch_on_every_architecture(tiny):
    ps = _toy_prompts(tiny.tokenizer)
    assert set(ps.groups) == {"a", "b"}
    shared = run_probe(tiny, ps, _settings(True, batch_size=3, keep_layers=(1, 3)))
    scratch = run_probe(tiny, ps, _settings(False, keep_layers=(1, 3)))
    _assert_equal_at_every_layer(shared, scratch)
    for layer in (1, 3):
        np.testing.assert_allclose(shared.residuals[layer], scratch.residuals[layer], atol=1e-4,
                                   rtol=1e-4)
    # the prefix runs once per group: fewer positions computed than whole prompts
    lengths = [len(t) for t in tiny.tokenizer(ps.prompts)["input_ids"]]
    assert shared.computed_tokens < sum(lengths) <= scratch.computed_tokens


def _sliding_gemma(word_tokenizer, window: int):
    """A tiny Gemma-3 whose sliding layers attend to ``window`` tokens."""
    from transformers import AutoModelForCausalLM

    from calibrate.model.load import wrap_model

    config = build_tiny("gemma3_text", len(word_tokenizer)).config
    config.sliding_window = window
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert "sliding_attention" in config.layer_types
    return wrap_model(model, word_tokenizer, name=f"tiny-gemma3-sliding{window}")


def test_reuse_equals_from_scratch_past_a_sliding_window(word_tokenizer):
    """Gemma-3 with a 4-token sliding window: prompts far longer than the window, so the cached
    sliding layers must hold exactly the keys a from-scratch pass sees (right padding keeps
    cache index == position)."""
    loaded = _sliding_gemma(word_tokenizer, 4)
    ps = _toy_prompts(word_tokenizer)
    assert min(len(t) for t in word_tokenizer(ps.prompts)["input_ids"]) > 8 * 4
    _assert_equal_at_every_layer(run_probe(loaded, ps, _settings(True, batch_size=4)),
                                 run_probe(loaded, ps, _settings(False)))


def test_gaps_reach_only_a_sliding_window(tiny, word_tokenizer):
    assert sliding_window(tiny) is None or tiny.adapter.model_type in ("mistral", "gemma3_text")
    small = _sliding_gemma(word_tokenizer, 4)
    assert sliding_window(small) == 4
    assert gaps_reach_window(small, 3, 2) and not gaps_reach_window(small, 2, 2)
    if sliding_window(tiny) is None:
        assert not gaps_reach_window(tiny, 10 ** 6, 10 ** 6)


def _spy_prefixes(monkeypatch) -> list[int]:
    """Record the length of every shared prefix run."""
    runs: list[int] = []
    original = SharedPrefix.run.__func__

    def run(cls, loaded, tokens):
        runs.append(len(tokens))
        return original(cls, loaded, tokens)

    monkeypatch.setattr(SharedPrefix, "run", classmethod(run))
    return runs


def _steerings(loaded):
    hidden = loaded.adapter.unembed_weight.shape[1]
    vecs = np.random.default_rng(1).standard_normal((2, hidden))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    last = loaded.adapter.num_blocks
    return [Steering(vecs[0], (1,), (0.0, 2.0, -3.0)), Steering(vecs[0], (0, 2), (0.0, 1.5)),
            Steering(vecs[1], (last,), (0.0, 4.0)), DirectionSweep(vecs, (2,), (0.0, 2.5))]


def _assert_steered_equal(loaded, ps, monkeypatch, batch_size=3) -> None:
    """Steered scores with the prefix reused equal whole prompts on their cache and full passes
    with the edit hooked in, at every layer; the prefix ran once per group."""
    runs = _spy_prefixes(monkeypatch)
    for steering in _steerings(loaded):
        runs.clear()
        shared = run_steered(loaded, ps, steering, _settings(True, batch_size=batch_size))
        assert len(runs) == len(set(ps.groups))
        whole = run_steered(loaded, ps, steering, _settings(False))
        full = run_steered(loaded, ps, steering, _settings(False), use_cache=False)
        np.testing.assert_allclose(shared, whole, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)
        np.testing.assert_allclose(shared, full, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)
        np.testing.assert_allclose(option_probabilities(shared), option_probabilities(full),
                                   atol=PROB_ATOL, rtol=0)
        assert not np.allclose(shared[-1, :, -1], shared[0, :, -1], atol=1e-3)  # it steered


def test_steered_reuse_equals_from_scratch_on_every_architecture(tiny, monkeypatch):
    """Suffixes of different lengths in one batch: each row's edited last token runs after its
    own suffix, across the masked gap to the batch's widest one."""
    ps = _toy_prompts(tiny.tokenizer)
    lengths = [len(t) for t in tiny.tokenizer(ps.prompts)["input_ids"]]
    assert len(set(lengths)) > 2
    _assert_steered_equal(tiny, ps, monkeypatch)


@pytest.mark.parametrize("window", [4, 96])
def test_steered_reuse_equals_from_scratch_with_a_sliding_window(word_tokenizer, monkeypatch,
                                                                 window):
    """Window 4: the gap could reach the window, so suffixes of one length run together;
    window 96: every prompt fits, gapped batches run as on full attention."""
    loaded = _sliding_gemma(word_tokenizer, window)
    ps = _toy_prompts(word_tokenizer, n=9)
    longest = max(len(t) for t in word_tokenizer(ps.prompts)["input_ids"])
    assert gaps_reach_window(loaded, 0, longest) == (window == 4)
    _assert_steered_equal(loaded, ps, monkeypatch, batch_size=4)


SHOTS = {"a": "question : the movie was great ? answer : good . question : fun ? answer : yes .",
         "b": "a very boring film . question : good or bad ? answer : bad ."}
CLOZE = [("a", " question : the movie ? answer :", ["very good fun", "bad", "not very good ."]),
         ("b", " question : is this a film ? answer :", ["yes", "no no"]),
         ("a", " the", ["was fun", "film", "is not very very good , it was bad", "the"]),
         ("b", " question : good or bad ? it was very", ["good", "very bad", "very good fun"]),
         ("a", " fun", ["yes", "no"]),
         ("b", " not", ["good", "bad"])]


def _cloze_requests(tokenizer):
    contexts = [SHOTS[g] + text for g, text, _ in CLOZE]
    return (build_requests(tokenizer, contexts, [opts for _, _, opts in CLOZE]),
            tuple(g for g, _, _ in CLOZE))


def _assert_cloze_equal(loaded, monkeypatch, batch_size=3) -> None:
    runs = _spy_prefixes(monkeypatch)
    reqs, groups = _cloze_requests(loaded.tokenizer)
    labels = np.zeros(len(reqs), dtype=int)
    shared = run_cloze(loaded, reqs, labels, _settings(True, batch_size=batch_size), "token",
                       keep_layers=(1, 3), groups=groups)
    assert len(runs) == 2
    scratch = run_cloze(loaded, reqs, labels, _settings(False), "token", keep_layers=(1, 3),
                        groups=groups)
    np.testing.assert_allclose(shared.option_logits, scratch.option_logits, atol=LOGIT_ATOL,
                               rtol=LOGIT_RTOL)
    np.testing.assert_allclose(shared.probs, scratch.probs, atol=PROB_ATOL, rtol=0)
    for layer in (1, 3):
        np.testing.assert_allclose(shared.residuals[layer], scratch.residuals[layer], atol=1e-4,
                                   rtol=1e-4)
    assert shared.computed_tokens < scratch.computed_tokens
    for steering in _steerings(loaded)[::2]:
        runs.clear()
        fast = run_cloze_steered(loaded, reqs, steering, _settings(True, batch_size=batch_size),
                                 "token", groups=groups)
        assert len(runs) == 2
        full = run_cloze_steered(loaded, reqs, steering, _settings(False), "token",
                                 use_cache=False, groups=groups)
        np.testing.assert_allclose(fast, full, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)
        np.testing.assert_allclose(fast[0], shared.option_logits, atol=LOGIT_ATOL,
                                   rtol=LOGIT_RTOL)
        assert not np.allclose(fast[-1, :, -1], fast[0, :, -1], atol=1e-3)


def test_cloze_reuse_equals_from_scratch_on_every_architecture(tiny, monkeypatch):
    """Shared exemplars before cloze contexts: every option's log-likelihood at every layer,
    unsteered and steered, equals whole contexts; the continuations run across the masked gap
    after a shorter context."""
    _assert_cloze_equal(tiny, monkeypatch)


@pytest.mark.parametrize("window", [4, 96])
def test_cloze_reuse_equals_from_scratch_with_a_sliding_window(word_tokenizer, monkeypatch,
                                                               window):
    _assert_cloze_equal(_sliding_gemma(word_tokenizer, window), monkeypatch, batch_size=4)


def test_zero_shot_prompts_take_the_full_pass(tiny):
    ps = build_prompts([MCRecord("the movie", ("yes", "no"), 0)], LETTERS, tiny.tokenizer,
                       style=PromptStyle(0))
    assert ps.groups is None  # nothing claimed shared: run_probe runs the prompt whole
    result = run_probe(tiny, ps, _settings(True))
    assert result.computed_tokens == len(tiny.tokenizer(ps.prompts)["input_ids"][0])


def test_five_shot_mmlu_on_smollm2_equals_from_scratch(cache_dir):
    """The real SmolLM2 on 5-shot MMLU rows of two subjects: every layer's probabilities with
    the prefix cache equal a from-scratch 5-shot run."""
    import calibrate
    from calibrate.tasks.shots import load_with_exemplars

    cfg = typed("dataset=mmlu", "dataset.subjects=[abstract_algebra,anatomy]",
                   "dataset.limit=6", "dataset.shuffle=true").dataset
    records, exemplars = load_with_exemplars(cfg, PromptStyle(5), cache_dir)
    lm = calibrate.load_model("smollm2")
    ps = build_prompts(records, cfg, lm.tokenizer, style=PromptStyle(5), exemplars=exemplars)
    assert len(set(ps.groups)) == 2
    shared = run_probe(lm, ps, _settings(True))
    scratch = run_probe(lm, ps, _settings(False))
    _assert_equal_at_every_layer(shared, scratch)
    assert (shared.probs[:, -1].argmax(-1) == scratch.probs[:, -1].argmax(-1)).all()


def test_five_shot_mmlu_steered_on_gemma3_past_its_sliding_window(cache_dir, monkeypatch):
    """The real Gemma-3-270M (512-token sliding window) on 5-shot MMLU prompts longer than the
    window: steered scores with the prefix reused (suffixes of one length per batch) equal whole
    prompts with the edit hooked into a full pass, at every layer."""
    import calibrate
    from calibrate.tasks.shots import load_with_exemplars

    cfg = typed("dataset=mmlu", "dataset.subjects=[astronomy]",
                   "dataset.limit=3").dataset
    records, exemplars = load_with_exemplars(cfg, PromptStyle(5), cache_dir)
    lm = calibrate.load_model("gemma3_270m")
    ps = build_prompts(records, cfg, lm.tokenizer, style=PromptStyle(5), exemplars=exemplars)
    window = sliding_window(lm)
    assert window == 512
    assert min(len(t) for t in lm.tokenizer(ps.prompts)["input_ids"]) > window
    runs = _spy_prefixes(monkeypatch)
    hidden = lm.adapter.unembed_weight.shape[1]
    vec = np.random.default_rng(0).standard_normal(hidden)
    steering = Steering(vec / np.linalg.norm(vec), (lm.adapter.num_blocks - 3,), (0.0, 40.0))
    shared = run_steered(lm, ps, steering, _settings(True))
    assert len(runs) == 1
    full = run_steered(lm, ps, steering, _settings(False), use_cache=False)
    np.testing.assert_allclose(option_probabilities(shared), option_probabilities(full),
                               atol=PROB_ATOL, rtol=0)
    assert not np.allclose(shared[1, :, -1], shared[0, :, -1], atol=1e-3)


def test_five_shot_arc_easy_cloze_on_smollm2_equals_from_scratch(cache_dir):
    """The real SmolLM2 on 5-shot ARC-Easy cloze rows: every option's log-likelihood at every
    layer with the exemplar prefix reused equals whole contexts."""
    import calibrate
    from calibrate.engine.scoring import score
    from calibrate.tasks.shots import load_with_exemplars

    cfg = typed("dataset=arc_easy", "dataset.limit=5", "dataset.shuffle=true").dataset
    records, exemplars = load_with_exemplars(cfg, PromptStyle(5), cache_dir)
    lm = calibrate.load_model("smollm2")
    ps = build_prompts(records, cfg, lm.tokenizer, style=PromptStyle(5), exemplars=exemplars)
    assert ps.is_cloze and len(set(ps.groups)) == 1
    shared = score(lm, ps, _settings(True))
    scratch = score(lm, ps, _settings(False))
    np.testing.assert_allclose(shared.option_logits, scratch.option_logits, atol=LOGIT_ATOL,
                               rtol=LOGIT_RTOL)
    np.testing.assert_allclose(shared.probs, scratch.probs, atol=PROB_ATOL, rtol=0)
    assert shared.computed_tokens < scratch.computed_tokens
