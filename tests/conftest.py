"""Shared fixtures: tiny random models for every adapter, a word-level tokenizer, the cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# One math thread per process: the suite runs CLI subprocesses beside in-process tests on 2
# cores, and a second thread mostly spins there (results do not depend on the thread count).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

WORDS = ("the a movie film was great terrible boring fun question answer is this sentence positive "
         "negative or good bad very not it yes no A B C D E . : ? , \n").split(" ")
TINY_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)

ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3_text", "phi", "gpt2", "gpt_neox", "opt")


def _config(model_type: str, vocab: int):
    from transformers import AutoConfig

    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=32, n_layer=3, n_head=4, n_positions=128,
                                    vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    if model_type == "opt":
        return AutoConfig.for_model("opt", hidden_size=32, ffn_dim=64, num_hidden_layers=3,
                                    num_attention_heads=4, word_embed_proj_dim=32,
                                    max_position_embeddings=128, vocab_size=vocab, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2)
    # gemma3: soft-capping on, low enough to bend random-init logits, so the lens must apply it
    extra = {"head_dim": 8, "final_logit_softcapping": 0.5} if model_type == "gemma3_text" else {}
    if model_type == "gpt_neox":
        extra = {"rotary_pct": 0.5}
    if model_type == "phi":
        extra = {"partial_rotary_factor": 0.5}
    return AutoConfig.for_model(model_type, vocab_size=vocab, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2, **TINY_SIZES, **extra)


@pytest.fixture(scope="session")
def word_tokenizer():
    """A word-level fast tokenizer: whitespace and punctuation split, no BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS:
        if word.strip() and word not in vocab:
            vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def build_tiny(model_type: str, vocab: int, seed: int = 0):
    """A random-init causal LM of ``model_type`` with 3 blocks and hidden size 32, float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(model_type, vocab), dtype=torch.float32)
    if getattr(model, "lm_head", None) is not None and model_type == "phi":
        assert model.lm_head.bias is not None  # Phi keeps a bias in its unembedding
    return model.eval()


@pytest.fixture(params=ARCHITECTURES)
def tiny(request, word_tokenizer):
    """A wrapped tiny model for each supported architecture."""
    from calibrate.model.load import wrap_model

    model = build_tiny(request.param, len(word_tokenizer))
    return wrap_model(model, word_tokenizer, name=f"tiny-{request.param}")


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The real user cache (assets are large: never re-downloaded per test)."""
    from calibrate.model.assets import cache_root

    return cache_root()


def composed(*overrides: str) -> dict:
    """The resolved job config the CLI would compose from ``overrides`` (plain containers)."""
    from omegaconf import OmegaConf

    from calibrate.api import compose

    return OmegaConf.to_container(compose(list(overrides)), resolve=True)


def typed(*overrides: str):
    """The typed config the CLI would build from ``overrides`` (every group checked)."""
    from calibrate.api import typed_config

    return typed_config(list(overrides))


def spec_of(*overrides: str):
    """The job spec the CLI would build from ``overrides``."""
    from calibrate.api import compose
    from calibrate.config.spec import build_spec

    return build_spec(compose(list(overrides)))
