"""A TransformerLens model (TransformerBridge, TransformerLens 4) read as calibrate's own:
the same weights (fingerprint), the same layer-wise readout, the model's own tokenizer.

Skipped without TransformerLens (the test extra installs it).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from calibrate.engine.probe import ProbeSettings, run_probe
from calibrate.model.load import wrap_model
from calibrate.model.transformerlens import (
    TransformerLensModelError,
    is_transformerlens,
    unwrap_bridge,
)
from calibrate.tasks.prompts import PromptConfig, build_prompts
from conftest import ARCHITECTURES, build_tiny

tl_bridge = pytest.importorskip("transformer_lens.model_bridge")

SENTENCES = ["the movie was great", "a very boring film", "this film is not good , it was bad", "fun"]
TOY = PromptConfig(name="toy", answer_format="verbalizer", verbalizer=(" negative", " positive"),
                   template="{question} \n question : is this sentence positive or negative ? answer :")


def _records():
    from types import SimpleNamespace

    return [SimpleNamespace(question=s, options=("bad", "good"), label=i % 2, subject="")
            for i, s in enumerate(SENTENCES)]


def _probe(loaded) -> np.ndarray:
    prompts = build_prompts(_records(), TOY, loaded.tokenizer)
    return run_probe(loaded, prompts, ProbeSettings(progress=False)).option_logits


@pytest.fixture(scope="module")
def saved_tokenizer(word_tokenizer, tmp_path_factory):
    """The word tokenizer read back from a folder: TransformerLens rereads it by its path."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    word_tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def _bridge(model, tokenizer):
    """A TransformerBridge around ``model`` (the bridge wraps it in place), warnings quiet."""
    model.config.architectures = [type(model).__name__]  # as a checkpoint's config.json says
    logging.disable(logging.WARNING)
    try:
        return tl_bridge.TransformerBridge.boot_transformers(
            "tiny", hf_model=model, tokenizer=tokenizer, device="cpu")
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_a_bridge_reads_as_the_transformers_model_it_wraps(model_type, word_tokenizer,
                                                          saved_tokenizer):
    import calibrate

    plain = wrap_model(build_tiny(model_type, len(word_tokenizer)), word_tokenizer,
                       name=f"tiny-{model_type}")
    bridged_model = copy.deepcopy(plain.model)
    bridge = _bridge(bridged_model, saved_tokenizer)
    assert is_transformerlens(bridge) and not is_transformerlens(plain.model)
    lm = calibrate.use_model(bridge, word_tokenizer, name=f"tiny-{model_type}")
    assert lm.model is not bridged_model and type(lm.model) is type(plain.model)
    assert lm.fingerprint == plain.fingerprint and lm.unembed_hash == plain.unembed_hash
    # the rebuilt model holds the bridge's own tensors: nothing copied
    ours = dict(lm.model.named_parameters())
    theirs = {id(p) for p in bridged_model.parameters()}
    assert ours and all(id(p) in theirs for p in ours.values())
    np.testing.assert_allclose(_probe(lm), _probe(plain), rtol=0, atol=1e-5)


def test_the_bridge_runs_as_before(word_tokenizer, saved_tokenizer):
    import calibrate

    bridge = _bridge(build_tiny("llama", len(word_tokenizer)), saved_tokenizer)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = bridge(ids).clone()
        calibrate.use_model(bridge, word_tokenizer)
        torch.testing.assert_close(bridge(ids), before, rtol=0, atol=0)


def test_processed_weights_are_refused_in_one_line(word_tokenizer, saved_tokenizer):
    import calibrate

    bridge = _bridge(build_tiny("llama", len(word_tokenizer)), saved_tokenizer)
    logging.disable(logging.WARNING)
    try:
        bridge.enable_compatibility_mode(disable_warnings=True)  # folds norms, centres W_U
    finally:
        logging.disable(logging.NOTSET)
    with pytest.raises(TransformerLensModelError) as err:
        calibrate.use_model(bridge, word_tokenizer)
    message = str(err.value)
    assert "\n" not in message and "processed" in message
    assert "enable_compatibility_mode(no_processing=True)" in message


def test_no_processing_compatibility_mode_is_accepted(word_tokenizer, saved_tokenizer):
    import calibrate

    plain = wrap_model(build_tiny("gpt2", len(word_tokenizer)), word_tokenizer, name="tiny")
    bridge = _bridge(copy.deepcopy(plain.model), saved_tokenizer)
    logging.disable(logging.WARNING)
    try:
        bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    finally:
        logging.disable(logging.NOTSET)
    lm = calibrate.use_model(bridge, word_tokenizer, name="tiny")
    assert lm.fingerprint == plain.fingerprint
    np.testing.assert_allclose(_probe(lm), _probe(plain), rtol=0, atol=1e-5)


def test_a_transformerlens_object_that_is_no_bridge_is_refused():
    from transformer_lens import HookedRootModule

    class Hooked(HookedRootModule):
        pass

    with pytest.raises(TransformerLensModelError, match="not a TransformerBridge"):
        unwrap_bridge(Hooked())


@pytest.mark.slow
def test_smollm2_through_transformerlens_reads_as_calibrates_own():
    """The real model: the bridge's tokenizer prepends BOS (TransformerLens's convention); the
    model's own does not, and that is what is read unless a tokenizer is passed."""
    from transformers import AutoTokenizer

    import calibrate

    ours = calibrate.load_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(ours.source)
    logging.disable(logging.WARNING)
    try:
        bridge = tl_bridge.TransformerBridge.boot_transformers(ours.source, tokenizer=tokenizer,
                                                               device="cpu")
    finally:
        logging.disable(logging.NOTSET)
    text = "Review: a great movie\nSentiment:"
    assert bridge.tokenizer(text).input_ids[0] == tokenizer.bos_token_id
    lm = calibrate.use_model(bridge, name="smollm2")
    assert lm.tokenizer(text).input_ids == tokenizer(text).input_ids
    assert lm.model.config._attn_implementation == ours.model.config._attn_implementation
    assert lm.fingerprint == ours.fingerprint and lm.unembed_hash == ours.unembed_hash
    records = calibrate.load_dataset("sst2", limit=4)
    theirs = calibrate.probe_layers(lm, records, dataset="sst2").result.option_logits
    own = calibrate.probe_layers(ours, records, dataset="sst2").result.option_logits
    np.testing.assert_allclose(theirs, own, rtol=0, atol=1e-5)
    with_bos = calibrate.use_model(bridge, bridge.tokenizer, name="smollm2")
    assert with_bos.tokenizer is bridge.tokenizer  # a tokenizer passed is the one used
