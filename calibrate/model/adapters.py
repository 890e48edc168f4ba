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


# --- MLP neurons and the final norm as an affine map (the neurons study) ---------------------


class UnsupportedMLP(UserError):
    """A block's MLP cannot be read or edited neuron by neuron."""


@dataclass(frozen=True)
class MLPParts:
    """Where one block's MLP keeps its neurons.

    ``down`` is the output projection: its input [..., d_mlp] holds the neurons' activations and
    row i of :attr:`out_weight` is what neuron i writes per unit of activation. ``mlp`` is the
    module whose output is the MLP's output before any norm; ``post_norm`` is the norm applied to
    that output before it joins the residual (Gemma-2 and Gemma-3's
    ``post_feedforward_layernorm``), None where the output joins the residual as it is.
    """

    down: nn.Module
    mlp: nn.Module
    post_norm: nn.Module | None
    conv1d: bool = False  # GPT-2's Conv1D stores its weight [in, out], nn.Linear [out, in]

    @property
    def out_weight(self) -> torch.Tensor:
        """[d_mlp, hidden]: row i is neuron i's output weight (before ``post_norm``)."""
        weight = self.down.weight
        return weight if self.conv1d else weight.T

    @property
    def width(self) -> int:
        """d_mlp, the number of neurons."""
        return int(self.out_weight.shape[0])


def _llama_mlp(block: nn.Module) -> MLPParts:
    return MLPParts(block.mlp.down_proj, block.mlp, None)


def _gemma2_mlp(block: nn.Module) -> MLPParts:
    return MLPParts(block.mlp.down_proj, block.mlp, block.post_feedforward_layernorm)


def _phi_mlp(block: nn.Module) -> MLPParts:
    return MLPParts(block.mlp.fc2, block.mlp, None)


def _gpt2_mlp(block: nn.Module) -> MLPParts:
    return MLPParts(block.mlp.c_proj, block.mlp, None, conv1d=True)


def _gpt_neox_mlp(block: nn.Module) -> MLPParts:
    return MLPParts(block.mlp.dense_4h_to_h, block.mlp, None)


def _opt_mlp(block: nn.Module) -> MLPParts:
    if not getattr(block, "do_layer_norm_before", True):
        raise UnsupportedMLP("OPT blocks that apply their layer norm after the residual sum "
                             "(do_layer_norm_before=false) have no neuron-wise residual write")
    return MLPParts(block.fc2, block.fc2, None)


_MLPS: dict[str, Callable[[nn.Module], MLPParts]] = {
    "llama": _llama_mlp,
    "mistral": _llama_mlp,
    "qwen2": _llama_mlp,
    "qwen3": _llama_mlp,
    "gemma": _llama_mlp,
    "gemma2": _gemma2_mlp,
    "gemma3_text": _gemma2_mlp,
    "phi": _phi_mlp,
    "gpt2": _gpt2_mlp,
    "gpt_neox": _gpt_neox_mlp,
    "opt": _opt_mlp,
}


def mlp_parts(adapter: Adapter, block: int) -> MLPParts:
    """The MLP of block ``block`` (1-based: the block whose output is layer ``block``)."""
    check_supported(adapter.model_type)
    if not 1 <= block <= adapter.num_blocks:
        raise ValueError(f"block {block} outside 1..{adapter.num_blocks}")
    return _MLPS[adapter.model_type](adapter.blocks[block - 1])


@dataclass(frozen=True)
class NormAffine:
    """The final norm as ``gain * centre(x) / scale(x) + bias``, with
    ``scale(x) = sqrt(mean(centre(x)^2) + eps)``: RMSNorm (no centring, no bias) or LayerNorm
    (centred, with bias). Holding ``scale`` fixed makes the norm affine in the residual: what
    the direct effect of an edit reads."""

    centre: bool
    gain: torch.Tensor  # [hidden] float32
    bias: torch.Tensor | None  # [hidden] float32
    eps: float

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """[..., 1] the norm's divisor of residuals ``x`` [..., hidden] (float32)."""
        x = x.float()
        if self.centre:
            x = x - x.mean(-1, keepdim=True)
        return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def linear(self, delta: torch.Tensor) -> torch.Tensor:
        """``gain * centre(delta)``: the numerator's change for a residual change ``delta``."""
        delta = delta.float()
        if self.centre:
            delta = delta - delta.mean(-1, keepdim=True)
        return self.gain.to(delta.device) * delta

    def held_scale_shift(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The normed state's change when residuals ``x`` [..., hidden] move by ``delta``
        (broadcast from the right) with the divisor held at ``scale(x)``: the direct effect."""
        return self.linear(delta) / self.scale(x)


def _rms(norm: nn.Module, offset: float) -> NormAffine:
    eps = getattr(norm, "variance_epsilon", None)
    eps = norm.eps if eps is None else eps
    return NormAffine(False, norm.weight.detach().float() + offset, None, float(eps))


def _layer_norm(norm: nn.Module) -> NormAffine:
    bias = None if norm.bias is None else norm.bias.detach().float()
    return NormAffine(True, norm.weight.detach().float(), bias, float(norm.eps))


_NORMS: dict[str, Callable[[nn.Module], NormAffine]] = {
    "llama": lambda n: _rms(n, 0.0),
    "mistral": lambda n: _rms(n, 0.0),
    "qwen2": lambda n: _rms(n, 0.0),
    "qwen3": lambda n: _rms(n, 0.0),
    "gemma": lambda n: _rms(n, 1.0),  # Gemma's RMSNorm multiplies by (1 + weight)
    "gemma2": lambda n: _rms(n, 1.0),
    "gemma3_text": lambda n: _rms(n, 1.0),
    "phi": _layer_norm,
    "gpt2": _layer_norm,
    "gpt_neox": _layer_norm,
    "opt": _layer_norm,
}


def final_norm_affine(adapter: Adapter) -> NormAffine:
    """The adapter's final norm written as :class:`NormAffine` (per architecture, explicit)."""
    check_supported(adapter.model_type)
    return _NORMS[adapter.model_type](adapter.final_norm)


def norm_affine(model_type: str, norm: nn.Module) -> NormAffine:
    """Any norm module of a ``model_type`` model as :class:`NormAffine` (the post-MLP norm)."""
    check_supported(model_type)
    return _NORMS[model_type](norm)


def block_hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden state of a block output: a tensor in transformers 5, a tuple's first item in 4.x."""
    return output[0] if isinstance(output, tuple) else output


def replace_block_hidden(output: torch.Tensor | tuple, hidden: torch.Tensor) -> torch.Tensor | tuple:
    """Return ``output`` with its hidden state replaced, keeping the container type."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden
