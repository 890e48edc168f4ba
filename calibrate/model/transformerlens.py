"""A TransformerLens model read as calibrate reads a transformers one.

TransformerLens 4 (``TransformerBridge``) wraps a transformers model: it inserts its own bridge
modules into the model's tree (``BlockBridge`` around each decoder layer, ``UnembeddingBridge``
around ``lm_head``, ...), each holding the original module as ``_original_component``. The
weights stay the model's own unless ``enable_compatibility_mode()`` processed them (folded norms,
centred writing weights and unembedding), after which the residual stream, W_U's null space and
the weights' fingerprint are no longer the model's.

:func:`unwrap_bridge` rebuilds the plain transformers model from the bridge's original modules:
a skeleton of the same class built on the meta device, whose every parameter and buffer is then
the bridge's own tensor object (nothing is copied, the bridge keeps working). So the same
architecture adapter reads it and its fingerprint equals a load of the same checkpoint.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from calibrate.errors import UserError


class TransformerLensModelError(UserError):
    """A TransformerLens model calibrate cannot read as the model's own weights."""


_ACCEPTED = ("accepted: a TransformerLens TransformerBridge with the model's own weights on one "
             "device (TransformerBridge.boot_transformers(...), or enable_compatibility_mode("
             "no_processing=True)), or the transformers model itself")


def is_transformerlens(model: Any) -> bool:
    """Whether ``model`` is a TransformerLens model (checked by its class, no import needed)."""
    return any(cls.__module__.split(".")[0] == "transformer_lens" for cls in type(model).__mro__)


def _original(module: nn.Module) -> nn.Module:
    """The module a TransformerLens bridge component wraps (the module itself if unwrapped)."""
    while "_original_component" in module._modules:
        inner = module._modules["_original_component"]
        if inner is None:
            break
        module = inner
    return module


def _resolve(root: nn.Module, path: str) -> nn.Module:
    """The original module at ``path`` (a transformers module name) in a bridged tree."""
    module = _original(root)
    for part in filter(None, path.split(".")):
        child = module._modules.get(part)
        if child is None:
            raise TransformerLensModelError(
                f"the TransformerLens model has no module {path!r} of its transformers model "
                f"(its tree differs from {type(root).__name__}'s); {_ACCEPTED}")
        module = _original(child)
    return module


def _check_bridge(bridge: Any) -> nn.Module:
    """The bridge's transformers model, or one clear error naming why it cannot be read."""
    if not hasattr(bridge, "adapter") or not hasattr(type(bridge), "original_model"):
        raise TransformerLensModelError(
            f"{type(bridge).__name__} from TransformerLens is not a TransformerBridge "
            f"(TransformerLens < 4 HookedTransformer models hold processed weights); {_ACCEPTED}")
    if getattr(bridge, "_weights_processed", False):
        raise TransformerLensModelError(
            "the TransformerLens model's weights were processed (enable_compatibility_mode: "
            "folded norms, centred writing weights and unembedding), so its layers, W_U and "
            f"fingerprint are not the model's own; {_ACCEPTED}")
    try:
        model = bridge.original_model
    except AttributeError as err:  # vLLM / Inspect drivers hold no local module
        raise TransformerLensModelError(
            f"the TransformerLens model holds no local torch module ({err}); {_ACCEPTED}") from err
    devices = {str(p.device) for p in model.parameters()}
    device_map = getattr(model, "hf_device_map", None) or {}
    if len(devices) > 1 or len({str(d) for d in device_map.values()}) > 1:
        raise TransformerLensModelError(
            f"the TransformerLens model is spread over {sorted(devices)} (device_map); pass the "
            "transformers model loaded with device_map to calibrate.use_model instead; "
            + _ACCEPTED)
    return model


def _skeleton(model: nn.Module) -> nn.Module:
    """An empty model of ``model``'s class and config, on the meta device (no memory).

    The bridge's capture settings are not the model's: it forces eager attention and
    ``output_attentions`` so that its hooks see attention patterns. The rebuilt model attends as
    transformers' default for the class does (as calibrate's own loading).
    """
    config = copy.deepcopy(model.config)
    config.output_attentions = False
    config._attn_implementation = None  # transformers picks its default (sdpa where supported)
    with torch.device("meta"):
        return type(model)(config)


def _own_tokenizer(tokenizer: Any) -> Any:
    """The checkpoint's tokenizer as transformers loads it, without TransformerLens's
    ``add_bos_token=True`` (its convention; the model's own tokenizer may not prepend BOS)."""
    from transformers import AutoTokenizer

    kwargs = copy.deepcopy(dict(getattr(tokenizer, "init_kwargs", {})))
    source = kwargs.pop("name_or_path", None) or getattr(tokenizer, "name_or_path", None)
    kwargs.pop("add_bos_token", None)
    try:
        own = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise TransformerLensModelError(
            f"the TransformerLens model's tokenizer ({source!r}) cannot be reread without "
            f"TransformerLens's add_bos_token=True ({str(err).splitlines()[0][:200]}); accepted: "
            "use_model(bridge, tokenizer=...) with the model's own tokenizer") from err
    own.padding_side = tokenizer.padding_side
    return own


def _adopt(skeleton: nn.Module, original: nn.Module, name: str) -> None:
    """Give ``skeleton`` the tensors of ``original``: the same objects, no copy."""
    if type(original) is not type(skeleton):
        raise TransformerLensModelError(
            f"the TransformerLens model's module {name or '(root)'!r} is a "
            f"{type(original).__name__}, not the {type(skeleton).__name__} of its transformers "
            f"class; {_ACCEPTED}")
    for key in skeleton._parameters:
        skeleton._parameters[key] = original._parameters.get(key)
    for key in skeleton._buffers:
        skeleton._buffers[key] = original._buffers.get(key)
    for key, value in vars(skeleton).items():  # tensors kept as plain attributes (rotary tables)
        if isinstance(value, torch.Tensor) and isinstance(vars(original).get(key), torch.Tensor):
            setattr(skeleton, key, vars(original)[key])


def unwrap_bridge(bridge: Any, tokenizer: Any = None) -> tuple[nn.Module, Any]:
    """The transformers model inside a TransformerLens ``TransformerBridge`` and its tokenizer.

    The returned model is a new module tree of the same transformers class whose parameters and
    buffers are the bridge's own tensors, without the bridge's wrappers or hooks. The tokenizer
    is ``tokenizer`` if given, else the checkpoint's own, reread without TransformerLens's BOS
    convention (so prompts tokenize as they do for the transformers model and lm-eval).
    """
    model = _check_bridge(bridge)
    rebuilt = _skeleton(model)
    for name, module in rebuilt.named_modules():
        _adopt(module, _resolve(model, name), name)
    left = [n for n, t in [*rebuilt.named_parameters(), *rebuilt.named_buffers()]
            if t is None or t.is_meta]
    if left:
        raise TransformerLensModelError(
            f"the TransformerLens model lacks tensors of its transformers model "
            f"({', '.join(left[:3])}); {_ACCEPTED}")
    rebuilt.generation_config = copy.deepcopy(getattr(model, "generation_config", None))
    rebuilt.train(False)
    if tokenizer is None and getattr(bridge, "tokenizer", None) is not None:
        tokenizer = _own_tokenizer(bridge.tokenizer)
    return rebuilt, tokenizer
