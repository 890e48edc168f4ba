"""What a fitted lens trains on: the seeded held-out split and position sample, every position's
residuals (against the model's own hidden states, one sequence at a time), the per-layer KL
(against the model's own logits in float64) and text files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ARCHITECTURES, build_tiny

from calibrate.engine.lens import LogitLens
from calibrate.errors import ConfigError
from calibrate.model.load import wrap_model
from calibrate.readouts import lens_text
from calibrate.readouts.readout_kind import ReadoutSource
from calibrate.readouts.translators import TranslatedLens
from calibrate.readouts.tuned_lens import TunedLensSettings
from calibrate.tasks.prompts import PromptSet


def test_the_held_out_split_is_seeded_disjoint_and_never_everything():
    fit, held = lens_text.split_sequences(50, 0.1, 3)
    assert len(held) == 5 and len(fit) == 45 and not set(fit) & set(held)
    assert sorted([*fit, *held]) == list(range(50))
    again = lens_text.split_sequences(50, 0.1, 3)
    assert np.array_equal(fit, again[0]) and np.array_equal(held, again[1])
    assert not np.array_equal(held, lens_text.split_sequences(50, 0.1, 4)[1])
    assert len(lens_text.split_sequences(3, 0.01, 0)[1]) == 1  # at least one
    assert len(lens_text.split_sequences(2, 0.9, 0)[1]) == 1  # never all
    assert len(lens_text.split_sequences(1, 0.5, 0)[1]) == 0
    assert len(lens_text.split_sequences(9, 0.0, 0)[1]) == 0


def test_positions_are_all_or_a_seeded_uniform_sample():
    lengths = [5, 1, 8, 3]
    every = lens_text.sample_positions(lengths, None, 0)
    assert [k.tolist() for k in every] == [list(range(n)) for n in lengths]
    assert [len(k) for k in lens_text.sample_positions(lengths, 17, 0)] == lengths
    sample = lens_text.sample_positions(lengths, 7, 0)
    assert sum(len(k) for k in sample) == 7
    assert all(set(k) <= set(range(n)) and len(set(k)) == len(k) for k, n in zip(sample, lengths))
    assert [k.tolist() for k in sample] == [k.tolist() for k in
                                             lens_text.sample_positions(lengths, 7, 0)]


def reference(loaded, sequences):
    """Per sequence, every position's residual [T, L+1, H], run alone: the model's own hidden
    states for layers 0 .. L-1, the final norm's input for layer L."""
    final = []
    handle = loaded.adapter.final_norm.register_forward_pre_hook(
        lambda _m, args: final.append(args[0].detach()))
    out = []
    try:
        for seq in sequences:
            with torch.no_grad():
                hidden = loaded.model(torch.tensor([seq]), output_hidden_states=True).hidden_states
            out.append(torch.stack([h[0] for h in hidden[:-1]] + [final[-1][0]], dim=1))
    finally:
        handle.remove()
    return out


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_residuals_at_kept_positions_equal_each_sequence_run_alone(model_type, word_tokenizer):
    loaded = wrap_model(build_tiny(model_type, len(word_tokenizer)), word_tokenizer,
                        name=f"tiny-{model_type}")
    rng = np.random.default_rng(0)
    sequences = [list(rng.integers(4, len(word_tokenizer), size=int(n))) for n in
                 (7, 3, 12, 5, 9, 2)]
    keep = lens_text.sample_positions([len(s) for s in sequences], 20, 1)
    expected = torch.cat([r[k] for r, k in zip(reference(loaded, sequences), keep)])
    # a small budget: several batches, left-padded; rows come back per batch (longest first)
    got = torch.cat(list(lens_text.residual_batches(loaded, sequences, keep, budget=24)))
    order = np.argsort([-len(s) for s in sequences], kind="stable")
    starts = np.cumsum([0, *[len(k) for k in keep]])
    expected = torch.cat([expected[starts[i]:starts[i + 1]] for i in order])
    assert got.shape == (20, loaded.adapter.num_blocks + 1, 32)
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "phi"])
def test_layer_kl_is_the_kl_to_the_models_own_distribution(model_type, word_tokenizer):
    loaded = wrap_model(build_tiny(model_type, len(word_tokenizer)), word_tokenizer,
                        name=f"tiny-{model_type}")
    seq = [5, 9, 13, 7, 21, 4, 11]
    residual = reference(loaded, [seq])[0]  # [T, L+1, H]
    with torch.no_grad():
        logits = loaded.model(torch.tensor([seq])).logits[0].double()  # the model's own
    lens = LogitLens(loaded.adapter)
    got = lens_text.layer_kl(lens, residual)
    logp = torch.log_softmax(logits, -1)
    all_ids = torch.arange(logits.shape[-1]).expand(len(seq), -1)
    for layer in range(residual.shape[1] - 1):
        logq = torch.log_softmax(lens.read_layers(residual[:, layer:layer + 1], [layer],
                                                  all_ids)[:, 0].double(), -1)
        expected = (logp.exp() * (logp - logq)).sum(-1).mean()
        assert got[layer] == pytest.approx(float(expected), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("rows", [1, 1 << 30])  # one layer per unembedding matmul, or all
def test_layer_kl_through_translators_is_each_layers_own_kl(rows, word_tokenizer, monkeypatch):
    loaded = wrap_model(build_tiny("llama", len(word_tokenizer)), word_tokenizer, name="tiny")
    gen = torch.Generator().manual_seed(3)
    residual = torch.randn(70, 4, 32, generator=gen) * 2  # two chunks of KL_CHUNK tokens
    translated = TranslatedLens(loaded.adapter, torch.randn(3, 32, 32, generator=gen) * 0.2,
                                torch.randn(3, 32, generator=gen), "random")
    lens = LogitLens(loaded.adapter)
    monkeypatch.setattr(lens_text, "KL_ROWS", rows)
    got = lens_text.layer_kl(lens, residual, translated.prepare)
    logp = torch.log_softmax(lens_text.full_logits(
        lens, lens.normalize(residual[:, -1])).double(), -1)
    for layer in range(3):
        normed = translated.prepare(residual[:, layer:layer + 1], [layer])[:, 0]
        logq = torch.log_softmax(lens_text.full_logits(lens, normed).double(), -1)
        expected = (logp.exp() * (logp - logq)).sum(-1).mean()
        assert got[layer] == pytest.approx(float(expected), rel=1e-9, abs=1e-12)
    # several lenses in one pass: each its own KL
    both = lens_text.layer_kls(lens, residual, {"logit": None, "translated": translated.prepare})
    np.testing.assert_array_equal(both["translated"], got)
    np.testing.assert_array_equal(both["logit"], lens_text.layer_kl(lens, residual))


def test_a_text_file_is_split_at_blank_lines_and_cut_into_windows(word_tokenizer, tmp_path):
    loaded = wrap_model(build_tiny("llama", len(word_tokenizer)), word_tokenizer, name="tiny")
    path = tmp_path / "t.txt"
    path.write_text("the movie was great\nvery fun\n\n\n\nit is bad .\r\n\r\nyes")
    text = lens_text.from_file(loaded, str(path), max_length=3)
    assert text.source["n_documents"] == 3
    ids = [word_tokenizer(d)["input_ids"] for d in
           ("the movie was great\nvery fun", "it is bad .", "yes")]
    assert [len(i) for i in ids] == [6, 4, 1]
    # windows of 3 tokens; windows of one token (the 4th of "it is bad .", "yes") are dropped
    assert text.sequences == [ids[0][:3], ids[0][3:], ids[1][:3]]


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00garbage", "cannot read it as UTF-8 text"),
    (b"\n\n \n", "holds no text"),
    (b"yes\n\nno", "no document has two tokens"),
])
def test_a_bad_text_file_is_one_line(word_tokenizer, tmp_path, content, message):
    loaded = wrap_model(build_tiny("llama", len(word_tokenizer)), word_tokenizer, name="tiny")
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as err:
        lens_text.from_file(loaded, str(path), 8)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_the_text_file_wins_over_the_calibration_prompts(word_tokenizer, tmp_path):
    loaded = wrap_model(build_tiny("llama", len(word_tokenizer)), word_tokenizer, name="tiny")
    path = tmp_path / "t.txt"
    path.write_text("the movie was great")
    prompts = PromptSet(["bad film"], np.zeros(1, np.int64), np.zeros((1, 2), np.int64),
                        [" a", " b"], False)
    src = ReadoutSource(loaded, prompts, None, 0, {"split": "calibration", "rows": 1})
    from_file = lens_text.training_text(TunedLensSettings(text_path=str(path)), src)
    from_prompts = lens_text.training_text(TunedLensSettings(), src)
    assert from_file.source["text"] == "file"
    assert from_prompts.source == {"text": "calibration split prompts", "split": "calibration",
                                   "rows": 1, "n_sequences": 1}
    assert from_file.digest != from_prompts.digest
