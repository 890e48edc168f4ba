"""Architecture adapters: where each model keeps its blocks, final norm and unembedding.

One explicit entry per ``model_type``; an unknown architecture is an error, never a guess by
attribute names (a wrong guess would silently read the wrong tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from calibrate.errors import UserError


class UnsupportedArchitecture(UserError):
    """The model's ``model_type`` has no adapter."""


@dataclass(frozen=True)
class Adapter:
    """The pieces of a causal LM the logit lens needs."""

    model_type: str
    blocks: nn.ModuleList
    final_norm: nn.Module
    unembed: nn.Linear
    backbone: nn.Module  # the decoder without the LM head
    softcap: float | None  # final logit soft-capping (Gemma 2), None when absent

    @property
    def num_blocks(self) -> int:
        """Number of transformer blocks L; the lens reads L + 1 layers."""
        return len(self.blocks)

    @property
    def unembed_weight(self) -> torch.Tensor:
        """The unembedding as stored by transformers: [vocab, hidden]."""
        return self.unembed.weight

    @property
    def unembed_bias(self) -> torch.Tensor | None:
        """The unembedding bias (Phi-2 has one), or None."""
        return self.unembed.bias


def _llama_like(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, nn.Linear]:
    base = model.model
    return base, base.layers, base.norm, model.lm_head


def _phi(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, nn.Linear]:
    base = model.model
    return base, base.layers, base.final_layernorm, model.lm_head


def _gpt2(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, nn.Linear]:
    base = model.transformer
    return base, base.h, base.ln_f, model.lm_head


def _gpt_neox(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, nn.Linear]:
    base = model.gpt_neox
    return base, base.layers, base.final_layer_norm, model.get_output_embeddings()


def _opt(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, nn.Linear]:
    decoder = model.model.decoder
    if decoder.final_layer_norm is None or decoder.project_out is not None:
        raise UnsupportedArchitecture(
            "OPT variants without a final layer norm or with project_out are not supported")
    return model.model, decoder.layers, decoder.final_layer_norm, model.lm_head


_PATHS: dict[str, Callable[[nn.Module], tuple[nn.Module, nn.ModuleList, nn.Module, nn.Linear]]] = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "qwen3": _llama_like,
    "gemma": _llama_like,
    "gemma2": _llama_like,
    "gemma3_text": _llama_like,
    "phi": _phi,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "opt": _opt,
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_PATHS))


def check_supported(model_type: str) -> None:
    """Raise :class:`UnsupportedArchitecture` unless ``model_type`` has an adapter."""
    if model_type not in _PATHS:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} has no adapter; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def get_adapter(model: nn.Module) -> Adapter:
    """Return the adapter for a transformers causal LM."""
    model_type = model.config.model_type
    check_supported(model_type)
    backbone, blocks, norm, unembed = _PATHS[model_type](model)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return Adapter(model_type, blocks, norm, unembed, backbone, softcap)


def block_hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden state of a block output: a tensor in transformers 5, a tuple's first item in 4.x."""
    return output[0] if isinstance(output, tuple) else output


def replace_block_hidden(output: torch.Tensor | tuple, hidden: torch.Tensor) -> torch.Tensor | tuple:
    """Return ``output`` with its hidden state replaced, keeping the container type."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden
