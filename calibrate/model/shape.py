"""A model's architecture and sizes, read from its config alone (before any weights)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from calibrate.model.adapters import check_supported
from calibrate.model.config import ModelConfig, ModelConfigError, one_line
from calibrate.model.source import check_source


def read_config(source: str, config: ModelConfig) -> Any:
    """The transformers config of ``source``; one error line when it cannot be read."""
    from transformers import AutoConfig

    kwargs = check_source(source, config)
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except Exception as err:  # a missing, broken or invalid config, an unknown hub id
        raise ModelConfigError(f"model {source!r} cannot be loaded ({one_line(err)[:300]}); accepted: "
                               "a local model folder, or a hub id that is cached or reachable") from err


def check_architecture(source: str, cfg: ModelConfig) -> str:
    """The ``model_type`` of ``source`` read from its config alone; an error if it has no adapter."""
    model_type = read_config(source, cfg).model_type
    check_supported(model_type)
    return model_type


@dataclass(frozen=True)
class ModelShape:
    """A model's sizes read from its config alone (before any weights)."""

    model_type: str
    num_blocks: int  # L: the lens reads layers 0..L
    hidden_size: int
    context_length: int | None  # the longest input in tokens, None when the config has none
    vocab_size: int


_SHAPE_KEYS = {
    "num_blocks": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "vocab_size": ("vocab_size", "n_vocab", "padded_vocab_size"),
    "context_length": ("max_position_embeddings", "n_positions", "max_sequence_length",
                       "seq_length", "n_ctx", "max_seq_len"),
}


def model_shape(source: str, cfg: ModelConfig, check: bool = True) -> ModelShape:
    """The number of blocks, hidden size, context length and vocabulary of ``source`` from its
    config (the text model's where the config nests a ``text_config``); no weights are read.

    With ``check`` (the default) an architecture without an adapter is an error too, as in
    :func:`check_architecture`, so this one call is the whole pre-weights model check.
    """
    hf_config = read_config(source, cfg)
    if check:
        check_supported(hf_config.model_type)
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    values: dict[str, int | None] = {}
    for what, keys in _SHAPE_KEYS.items():
        found = next((v for k in keys for v in (getattr(text, k, None),)
                      if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)
        if found is None and what != "context_length":
            raise ModelConfigError(f"model {source!r}: its config has no {what} (looked for "
                                   f"{', '.join(keys)}); accepted: a transformers causal-LM config")
        values[what] = found
    return ModelShape(str(hf_config.model_type), **values)  # type: ignore[arg-type]
