"""Cloze scoring through the lens against independent references: the model's own log-likelihood
(lm-eval's score), a from-scratch per-layer lens built from ``output_hidden_states``, hand-built
models with known log-probabilities, and lm-eval's tokenization rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import build_tiny
from references import loglik_reference

from calibrate.engine import cloze as cloze_mod
from calibrate.engine import cloze_plan
from calibrate.engine.cloze import run_cloze
from calibrate.engine.cloze_plan import token_plan
from calibrate.engine.probe import ProbeSettings
from calibrate.model.load import wrap_model
from calibrate.tasks.continuations import ClozeRequest, build_requests, cloze_divisors

# multi-token options of different lengths (some sharing leading tokens); 2, 3 and 4 options
CONTEXTS = ["question : the movie was great ? answer :", "question : is this a film ? answer :",
            "the movie", "a very boring film . question : good or bad ? answer :"]
OPTIONS = [["very good fun", "bad", "not very good ."], ["yes", "no no"],
           ["was fun", "film", "is not very very good , it was bad", "the"],
           ["good", "very bad", "very good", "very good fun , not bad"]]
LABELS = np.array([0, 1, 2, 1])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: thread start-up costs more than the work (and stalls on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quiet(**kwargs) -> ProbeSettings:
    return ProbeSettings(progress=False, **kwargs)


def scratch_layers(loaded, request: ClozeRequest) -> np.ndarray:
    """[L+1, K] per-layer log-likelihoods, each option run alone through output_hidden_states;
    the model's own final norm and head, the last entry (already normalized) used as is."""
    adapter, n = loaded.adapter, len(request.context_ids)
    out = []
    with torch.no_grad():
        for cont in request.continuations:
            ids = torch.tensor([request.context_ids + cont])
            hidden = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
            per_layer = []
            for layer, h in enumerate(hidden):
                normed = h[0] if layer == len(hidden) - 1 else adapter.final_norm(h[0])
                logits = adapter.unembed(normed).double()
                if adapter.softcap is not None:
                    logits = torch.tanh(logits / adapter.softcap) * adapter.softcap
                logp = torch.log_softmax(logits[n - 1:-1], -1)
                per_layer.append(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()))
            out.append(per_layer)
    return np.array(out).T


def test_last_layer_equals_model_loglik(tiny):
    requests = build_requests(tiny, CONTEXTS, OPTIONS)
    assert len({len(c) for r in requests for c in r.continuations}) >= 4  # lengths 1 .. 10
    result = run_cloze(tiny, requests, LABELS, quiet())
    assert result.option_logits.shape == (4, tiny.adapter.num_blocks + 1, 4)
    for i, request in enumerate(requests):
        np.testing.assert_allclose(result.option_logits[i, -1, :request.n_options],
                                   loglik_reference(tiny, request), rtol=0, atol=1e-4)


def test_every_layer_equals_from_scratch(tiny):
    requests = build_requests(tiny, CONTEXTS, OPTIONS)
    result = run_cloze(tiny, requests, LABELS, quiet(batch_size=4))
    for i, request in enumerate(requests):
        np.testing.assert_allclose(result.option_logits[i, :, :request.n_options],
                                   scratch_layers(tiny, request), rtol=0, atol=1e-4)


def test_batched_equals_unbatched(tiny):
    requests = build_requests(tiny, CONTEXTS * 2, OPTIONS[::-1] * 2)
    labels = np.zeros(len(requests), dtype=np.int64)
    keep = (0, tiny.adapter.num_blocks)
    batched = run_cloze(tiny, requests, labels, quiet(batch_size=8), keep_layers=keep)
    single = run_cloze(tiny, requests, labels, quiet(batch_size=1), keep_layers=keep)
    np.testing.assert_allclose(batched.option_logits, single.option_logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(batched.probs, single.probs, rtol=0, atol=1e-6)
    for layer in keep:
        np.testing.assert_allclose(batched.residuals[layer], single.residuals[layer], atol=1e-5)


def test_variable_option_counts_are_minus_inf_padded(tiny):
    requests = build_requests(tiny, CONTEXTS, OPTIONS)
    result = run_cloze(tiny, requests, LABELS, quiet())
    assert np.all(np.isneginf(result.option_logits[1, :, 2:]))
    assert np.all(np.isneginf(result.option_logits[0, :, 3]))
    assert np.all(result.probs[1, :, 2:] == 0.0) and np.all(result.probs[0, :, 3] == 0.0)
    assert np.all(np.isfinite(result.option_logits[2]))
    np.testing.assert_allclose(result.probs.sum(-1), 1.0, atol=1e-12)
    assert result.probs.dtype == np.float64 and result.option_mass is None


def test_residuals_are_the_last_context_position(tiny):
    requests = build_requests(tiny, CONTEXTS[:2], OPTIONS[:2])
    layers = tiny.adapter.num_blocks + 1
    result = run_cloze(tiny, requests, LABELS[:2], quiet().keeping(range(layers)))
    for i, request in enumerate(requests):
        with torch.no_grad():
            hidden = tiny.model(input_ids=torch.tensor([request.context_ids]),
                                output_hidden_states=True).hidden_states
        for layer in range(layers - 1):  # the last entry of hidden_states is normalized
            np.testing.assert_allclose(result.residuals[layer][i], hidden[layer][0, -1].numpy(),
                                       rtol=1e-5, atol=1e-5)


def _llama(word_tokenizer, blocks_off: bool = True, head_zero: bool = False):
    model = build_tiny("llama", len(word_tokenizer))
    with torch.no_grad():
        for block in model.model.layers:
            if blocks_off:  # each block adds nothing: every layer's residual is the embedding
                block.self_attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
        if head_zero:
            model.lm_head.weight.zero_()
    return wrap_model(model, word_tokenizer, name="hand-built")


def test_uniform_head_gives_known_logliks_and_norms(word_tokenizer):
    """A zero unembedding: every token has log-probability -log V at every layer."""
    lm = _llama(word_tokenizer, blocks_off=False, head_zero=True)
    requests = build_requests(lm, CONTEXTS, OPTIONS)
    lengths = cloze_divisors(requests, "token")
    raw = run_cloze(lm, requests, LABELS, quiet())
    expected = -lengths * math.log(len(word_tokenizer))
    for i, request in enumerate(requests):
        k = request.n_options
        np.testing.assert_allclose(raw.option_logits[i, :, :k], np.broadcast_to(expected[i, :k], (4, k)),
                                   rtol=1e-6)
    per_token = run_cloze(lm, requests, LABELS, quiet(), norm="token")
    valid = np.isfinite(per_token.option_logits)
    np.testing.assert_allclose(per_token.option_logits[valid], -math.log(len(word_tokenizer)), rtol=1e-6)
    np.testing.assert_allclose(per_token.probs[0, -1], [1 / 3, 1 / 3, 1 / 3, 0.0], atol=1e-12)
    per_char = run_cloze(lm, requests, LABELS, quiet(), norm="char")
    chars = [[len(o) for o in opts] for opts in OPTIONS]  # the option text, without the delimiter
    for i, request in enumerate(requests):
        k = request.n_options
        np.testing.assert_allclose(per_char.option_logits[i, -1, :k], expected[i, :k] / chars[i], rtol=1e-6)


def test_bigram_model_known_logprobs(word_tokenizer):
    """Blocks that add nothing make a bigram model: log p(next | prev) = log_softmax(U rms(E[prev]))
    at every layer, computed here by hand; checks which position predicts which token."""
    lm = _llama(word_tokenizer)
    emb = lm.model.model.embed_tokens.weight.double().numpy()
    head = lm.model.lm_head.weight.double().numpy()
    eps, weight = lm.model.config.rms_norm_eps, lm.model.model.norm.weight.double().numpy()

    def logprob(prev: int, nxt: int) -> float:
        x = emb[prev]
        logits = head @ (x / np.sqrt(np.mean(x * x) + eps) * weight)
        return float(logits[nxt] - np.log(np.exp(logits - logits.max()).sum()) - logits.max())

    requests = build_requests(lm, CONTEXTS, OPTIONS)
    result = run_cloze(lm, requests, LABELS, quiet(batch_size=3))
    for i, request in enumerate(requests):
        for k, cont in enumerate(request.continuations):
            seq = [request.context_ids[-1], *cont]
            expected = sum(logprob(a, b) for a, b in zip(seq[:-1], seq[1:]))
            np.testing.assert_allclose(result.option_logits[i, :, k], expected, rtol=0, atol=1e-4)


def test_norms_divide_the_log_likelihood(tiny):
    requests = build_requests(tiny, CONTEXTS, OPTIONS)
    raw = run_cloze(tiny, requests, LABELS, quiet())
    scored = {norm: run_cloze(tiny, requests, LABELS, quiet(), norm=norm)
              for norm in ("token", "char", "byte")}
    for i, request in enumerate(requests):
        k = request.n_options
        divisors = {"token": [len(c) for c in request.continuations],
                    "char": [len(o) for o in OPTIONS[i]],  # lm-eval's acc_norm: len(choice)
                    "byte": [len(o.encode("utf-8")) for o in OPTIONS[i]]}
        for norm, result in scored.items():
            expected = raw.option_logits[i, :, :k] / np.array(divisors[norm], dtype=np.float64)
            np.testing.assert_allclose(result.option_logits[i, :, :k], expected)
        z = np.exp(scored["token"].option_logits[i, :, :k]
                   - scored["token"].option_logits[i, :, :k].max(-1, keepdims=True))
        np.testing.assert_allclose(scored["token"].probs[i, :, :k], z / z.sum(-1, keepdims=True),
                                   atol=1e-12)
    with pytest.raises(ValueError, match="cloze_norm='chars'"):
        run_cloze(tiny, requests, LABELS, quiet(), norm="chars")


def test_empty_continuation_raises(tiny):
    with pytest.raises(ValueError, match="option '' of example 1"):
        build_requests(tiny, CONTEXTS[:2], [["good", "bad"], ["yes", ""]])
    with pytest.raises(ValueError, match="no options"):
        build_requests(tiny, CONTEXTS[:1], [[]])


def _byte_bpe(bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Question: which is a mammal?\nAnswer: a whale", "Answer: yes or no", "Answer:  two spaces",
              "the whale swims; the dog runs; yes, no, maybe"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def _lm_eval_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HFLM._encode_pair, written out independently."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


@pytest.mark.parametrize("bos", [False, True])
def test_tokenization_follows_lm_eval(word_tokenizer, bos):
    lm = _llama(word_tokenizer)
    lm.tokenizer = _byte_bpe(bos)
    contexts = ["Question: which is a mammal?\nAnswer:", "Answer: ", "Answer:\n", ""]
    options = [["a whale", "the dog"], ["yes", "no"], ["maybe", "two spaces"], ["yes", "whale"]]
    requests = build_requests(lm, contexts, options)
    for context, opts, request in zip(contexts, options, requests):
        assert request.option_texts == tuple(opts)
        for option, cont in zip(opts, request.continuations):
            ctx_ids, cont_ids = _lm_eval_pair(lm.tokenizer, context, " " + option)
            assert cont == cont_ids
        if context:
            assert request.context_ids == ([1] if bos else []) + ctx_ids
        else:
            assert request.context_ids == [lm.tokenizer.bos_token_id]  # lm-eval's prefix token
    assert build_requests(lm.tokenizer, contexts, options) == requests  # a bare tokenizer works
    # the trailing space of "Answer: " is not a context token: it leads the continuation
    assert requests[1].context_ids == lm.tokenizer("Answer:")["input_ids"]
    assert lm.tokenizer.decode(requests[1].continuations[0]) == "  yes"


def test_options_sharing_a_prefix_share_lens_states():
    # rows 0-2 belong to example 0, row 3 to example 1; rows 0 and 1 run at sources 2.. and 4..
    plan = token_plan([[5, 6, 7], [5, 6, 8], [9], [5]], [0, 0, 0, 1], row_base=[2, 4, -1, -1])
    # example 0: (), (5,), (5, 6) -> 3 states read at sources 0, 2, 3; example 1: () at source 1
    assert plan.state_src.tolist() == [0, 2, 3, 1]
    assert plan.token_state.tolist() == [0, 1, 2, 0, 1, 2, 0, 3]
    assert plan.token_target.tolist() == [5, 6, 7, 5, 6, 8, 9, 5]
    assert plan.token_row.tolist() == [0, 0, 0, 1, 1, 1, 2, 3]


def test_continuation_groups_skip_single_tokens_and_limit_padding():
    widths = [8, 0, 7, 1, 8, 2, 0, 1]
    for fill in (0.9, 0.3):
        groups = cloze_plan.continuation_groups(widths, quiet(min_fill=fill))
        assert sorted(np.concatenate(groups).tolist()) == [0, 2, 3, 4, 5, 7]  # width 0: nothing to run
        for group in groups:
            w = np.asarray(widths)[group]
            assert w.sum() / (w.max() * len(group)) >= min(fill, cloze_plan.CONTINUATION_MIN_FILL)
        assert np.asarray(widths)[groups[0]].max() == 8
    groups = cloze_plan.continuation_groups([8, 0, 7, 1, 8, 1, 0, 1, 1], quiet(min_fill=0.9))
    assert [sorted(g.tolist()) for g in groups] == [[0, 2, 3, 4, 5, 7], [8]]  # fill 27/56 < 0.5


def test_several_continuation_groups_are_used(tiny, monkeypatch):
    requests = build_requests(tiny, CONTEXTS, OPTIONS)
    real_pass, calls = cloze_mod._continuation_pass, []

    def counted(loaded, cache, mask, row_example, inputs, device):
        calls.append(len(inputs))
        return real_pass(loaded, cache, mask, row_example, inputs, device)

    monkeypatch.setattr(cloze_mod, "_continuation_pass", counted)
    result = run_cloze(tiny, requests, LABELS, quiet(batch_size=4))
    assert len(calls) > 1  # the cache was copied for all but the last group
    assert sum(calls) == sum(len(c) > 1 for r in requests for c in r.continuations)
    assert result.padding_efficiency > 0.5


def test_lens_chunks_do_not_change_the_result(tiny, monkeypatch):
    requests = build_requests(tiny, CONTEXTS, OPTIONS)
    whole = run_cloze(tiny, requests, LABELS, quiet())
    monkeypatch.setattr(cloze_mod, "LENS_ROWS_CPU", 1)  # one state per step
    monkeypatch.setattr(cloze_mod, "LENS_VOCAB_CPU", 7)  # many vocabulary chunks
    chunked = run_cloze(tiny, requests, LABELS, quiet())
    np.testing.assert_allclose(chunked.option_logits, whole.option_logits, rtol=0, atol=1e-5)


def test_single_token_options_skip_the_continuation_pass(tiny, monkeypatch):
    requests = build_requests(tiny, CONTEXTS[:2], [["good", "bad"], ["yes", "no"]])

    def never(*_args, **_kwargs):
        raise AssertionError("continuation pass run for single-token options")

    monkeypatch.setattr(cloze_mod, "_continuation_pass", never)
    result = run_cloze(tiny, requests, LABELS[:2], quiet())
    for i, request in enumerate(requests):
        np.testing.assert_allclose(result.option_logits[i, -1, :2], loglik_reference(tiny, request), atol=1e-4)


def test_hooks_are_removed_and_oom_halves_the_batch(tiny, monkeypatch):
    requests = build_requests(tiny, CONTEXTS, OPTIONS)
    reference = run_cloze(tiny, requests, LABELS, quiet(batch_size=1))
    real_batch, sizes = cloze_mod.cloze_batch, []

    def flaky(loaded, lens, batch, *args):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_batch(loaded, lens, batch, *args)

    monkeypatch.setattr(cloze_mod, "cloze_batch", flaky)
    result = run_cloze(tiny, requests, LABELS, quiet(batch_size=4))
    assert sizes[0] == 4 and max(sizes[1:]) <= 2
    np.testing.assert_allclose(result.option_logits, reference.option_logits, atol=1e-5)
    blocks = tiny.adapter.blocks
    assert not blocks[0]._forward_pre_hooks and not any(b._forward_hooks for b in blocks)


def test_every_layer_through_a_translated_lens_equals_from_scratch(tiny):
    """Cloze under ``lens=tuned``/``affine``: every continuation token's state of layer ℓ is read
    as ``h + W_ℓ h + b_ℓ`` through the final norm and head, the last layer as the model reads it
    (its own log-likelihood), against each option run alone here."""
    from calibrate.readouts.translators import TranslatedLens

    adapter, blocks = tiny.adapter, tiny.adapter.num_blocks
    hidden = int(adapter.unembed_weight.shape[1])
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn((blocks, hidden, hidden), generator=gen) * 0.3 / hidden ** 0.5
    bias = torch.randn((blocks, hidden), generator=gen) * 0.3
    lens = TranslatedLens(adapter, weight, bias, "random")
    requests = build_requests(tiny, CONTEXTS, OPTIONS)
    result = run_cloze(tiny, requests, LABELS, quiet(batch_size=4), readout=lens)
    plain = run_cloze(tiny, requests, LABELS, quiet(batch_size=4))
    for i, request in enumerate(requests):
        n, expected = len(request.context_ids), []
        with torch.no_grad():
            for cont in request.continuations:
                ids = torch.tensor([request.context_ids + cont])
                states = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states
                row = []
                for layer, h in enumerate(states[:-1]):
                    h = h[0].float()
                    moved = h + h @ weight[layer].T + bias[layer] if layer < blocks else h
                    logits = adapter.unembed(adapter.final_norm(moved)).double()
                    if adapter.softcap is not None:
                        logits = torch.tanh(logits / adapter.softcap) * adapter.softcap
                    logp = torch.log_softmax(logits[n - 1:-1], -1)
                    row.append(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()))
                expected.append(row)
        got = result.option_logits[i, :, :request.n_options]
        np.testing.assert_allclose(got[:-1], np.array(expected).T, rtol=0, atol=1e-4)
        np.testing.assert_allclose(got[-1], loglik_reference(tiny, request), rtol=0, atol=1e-4)
        np.testing.assert_allclose(got[-1], plain.option_logits[i, -1, :request.n_options],
                                   rtol=0, atol=1e-6)
    assert not np.allclose(result.option_logits[:, :-1], plain.option_logits[:, :-1], atol=1e-3)
