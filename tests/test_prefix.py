"""Shared-prefix reuse (calibrate/engine/prefix.py): equal to from-scratch k-shot prompts at
every layer, on every tiny architecture, on a sliding-window model and on the real SmolLM2.

Tolerance (float32 weights): option logits within atol 2e-3 + rtol 1e-4, probabilities within
atol 1e-4 at every layer; measured on SmolLM2 5-shot MMLU: 2.3e-5 (logits) and 3.2e-6 (probs).
"""

from __future__ import annotations

import numpy as np
import torch
from conftest import build_tiny, composed

from calibrate.engine.prefix import common_prefix_length, plan_prefixes, right_pad_suffixes
from calibrate.engine.probe import ProbeSettings, run_probe
from calibrate.tasks.prompts import build_prompts
from calibrate.tasks.records import MCRecord
from calibrate.tasks.shots import Exemplars, PromptStyle

LOGIT_ATOL, LOGIT_RTOL, PROB_ATOL = 2e-3, 1e-4, 1e-4
LETTERS = {"name": "toy", "answer_format": "letters", "verbalizer": None,
           "template": "question : {question}\n{choices}\nanswer :"}


def _settings(reuse: bool, **kw) -> ProbeSettings:
    return ProbeSettings(progress=False, option_mass="all", prefix_reuse=reuse, **kw)


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


def test_reuse_equals_from_scratch_past_a_sliding_window(word_tokenizer):
    """Gemma-3 with a 4-token sliding window: prompts far longer than the window, so the cached
    sliding layers must hold exactly the keys a from-scratch pass sees (right padding keeps
    cache index == position)."""
    from transformers import AutoModelForCausalLM

    from calibrate.model.load import wrap_model

    tiny = build_tiny("gemma3_text", len(word_tokenizer))
    config = tiny.config
    config.sliding_window = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert "sliding_attention" in config.layer_types
    loaded = wrap_model(model, word_tokenizer, name="tiny-gemma3-sliding")
    ps = _toy_prompts(word_tokenizer)
    assert min(len(t) for t in word_tokenizer(ps.prompts)["input_ids"]) > 8 * config.sliding_window
    _assert_equal_at_every_layer(run_probe(loaded, ps, _settings(True, batch_size=4)),
                                 run_probe(loaded, ps, _settings(False)))


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

    cfg = composed("dataset=mmlu", "dataset.subjects=[abstract_algebra,anatomy]",
                   "dataset.limit=6", "dataset.shuffle=true")["dataset"]
    records, exemplars = load_with_exemplars(cfg, PromptStyle(5), cache_dir)
    lm = calibrate.load_model("smollm2")
    ps = build_prompts(records, cfg, lm.tokenizer, style=PromptStyle(5), exemplars=exemplars)
    assert len(set(ps.groups)) == 2
    shared = run_probe(lm, ps, _settings(True))
    scratch = run_probe(lm, ps, _settings(False))
    _assert_equal_at_every_layer(shared, scratch)
    assert (shared.probs[:, -1].argmax(-1) == scratch.probs[:, -1].argmax(-1)).all()
