"""Model loading: dtype/device resolution, weight hashes, the real SmolLM2, unsupported types."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from calibrate.adapters import UnsupportedArchitecture
from calibrate.models import (ModelConfigError, load_model, resolve_dtype, resolve_device,
                              resolve_source, tensor_hash)


def model_cfg(name: str) -> dict[str, Any]:
    from calibrate.api import compose

    return OmegaConf.to_container(compose([f"model={name}"]), resolve=True)["model"]


@pytest.fixture(scope="session")
def smollm2(cache_dir: Path):
    """The real SmolLM2-135M, loaded once (prepared into the cache on first use)."""
    from calibrate.assets import AssetError

    try:
        return load_model(model_cfg("smollm2"), cache_dir)
    except AssetError as err:  # pragma: no cover - no offline copy and no network
        pytest.skip(f"smollm2 unavailable: {err}")


@pytest.mark.parametrize("name, device, expected", [
    ("auto", "cpu", torch.float32), ("auto", "cuda", torch.bfloat16),
    ("auto", "cuda:1", torch.bfloat16), ("float32", "cuda", torch.float32),
    ("bfloat16", "cpu", torch.bfloat16), ("float16", "cpu", torch.float16),
])
def test_resolve_dtype(name, device, expected):
    assert resolve_dtype(name, device) is expected


def test_resolve_dtype_rejects_unknown():
    with pytest.raises(ModelConfigError, match=r"model.dtype='float8'; accepted: auto, float32"):
        resolve_dtype("float8", "cpu")


def test_resolve_device():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:3") == "cuda:3"


def test_auto_is_float32_on_cpu_here():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert resolve_dtype("auto", resolve_device("auto")) is torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_hash_equal_and_sensitive(dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(17, 9, generator=gen).to(dtype)
    b = a.clone()
    assert a.data_ptr() != b.data_ptr()
    assert tensor_hash(a) == tensor_hash(b)
    assert len(tensor_hash(a)) == 64 and int(tensor_hash(a), 16) >= 0
    c = a.clone()
    c[16, 8] = c[16, 8] + 1  # one element, the very last byte range
    assert tensor_hash(c) != tensor_hash(a)
    d = a.clone()
    d[0, 0] = -d[0, 0]  # only the sign bit
    assert tensor_hash(d) != tensor_hash(a)


def test_tensor_hash_is_of_the_values_not_the_layout():
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    t = a.T  # non-contiguous view
    assert tensor_hash(t) == tensor_hash(t.contiguous())
    assert tensor_hash(a) != tensor_hash(t)
    assert tensor_hash(a) != tensor_hash(a.to(torch.bfloat16))
    p = torch.nn.Parameter(a.clone())  # parameters that require grad hash fine
    assert tensor_hash(p) == tensor_hash(a)


def test_smollm2_loads_as_expected(smollm2, cache_dir):
    lm = smollm2
    model, adapter = lm.model, lm.adapter
    assert lm.name == "smollm2"
    assert Path(lm.source).parent == cache_dir / "models"
    assert (Path(lm.source) / ".complete").is_file()
    assert model.config.model_type == "llama" and adapter.model_type == "llama"
    assert adapter.num_blocks == 30 and adapter.num_blocks + 1 == 31
    assert model.config.hidden_size == 576 and adapter.unembed_weight.shape[1] == 576
    embed = model.get_input_embeddings().weight
    unembed = adapter.unembed_weight
    assert unembed is embed or (unembed.shape == embed.shape and torch.equal(unembed, embed))
    assert adapter.unembed_bias is None and adapter.softcap is None
    params = list(model.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    assert all(p.device.type == "cpu" for p in params) and lm.device.type == "cpu"
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in params)
    assert lm.unembed_hash == tensor_hash(unembed)
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token is not None


def test_smollm2_last_layer_lens_equals_model_logits(smollm2):
    """Trap 1 on the real model: the lens at the last layer is the model's own output."""
    from calibrate.hooks import capture_last_position
    from calibrate.lens import Lens

    enc = smollm2.tokenizer(["Review: a gripping film\nSentiment:", "Answer:"], padding=True,
                            return_tensors="pt")
    with torch.no_grad(), capture_last_position(smollm2.adapter) as store:
        logits = smollm2.model(**enc).logits[:, -1]
    assert len(store) == 31
    lens = Lens(smollm2.adapter)
    normed = lens.normalize(torch.stack(store, dim=1))
    ids = torch.tensor([[3524, 2731], [787, 9805]])
    got = lens.option_logits(normed, ids)[:, -1]
    torch.testing.assert_close(got, torch.gather(logits, 1, ids), rtol=1e-4, atol=1e-4)


def write_config(folder: Path, model_type: str, **values: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, **values}))
    return folder


@pytest.mark.parametrize("model_type", ["bert", "t5"])
def test_unsupported_local_folder_fails_before_weights(tmp_path, monkeypatch, model_type):
    import transformers

    folder = write_config(tmp_path / model_type, model_type)
    assert not any(p.suffix in (".safetensors", ".bin") for p in folder.iterdir())

    def no_weights(*_args, **_kwargs):
        raise AssertionError("the weights were read before the architecture was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    cfg = {"name": "fake", "path": str(folder), "device": "cpu", "dtype": "float32"}
    with pytest.raises(UnsupportedArchitecture, match=f"'{model_type}'.*supported: .*llama"):
        load_model(cfg)


def test_resolve_source_prefers_path_and_needs_one(tmp_path):
    cfg = {"name": "x", "path": str(tmp_path), "offline": {"bad": 1}}
    assert resolve_source(cfg) == str(tmp_path)
    with pytest.raises(ModelConfigError, match="'x' has neither model.path nor an offline copy"):
        resolve_source({"name": "x", "path": None, "offline": None})


def test_check_architecture_reads_only_the_config(tmp_path, smollm2):
    from calibrate.models import check_architecture

    assert check_architecture(smollm2.source, {}) == "llama"
    with pytest.raises(UnsupportedArchitecture, match="'bert'"):
        check_architecture(str(write_config(tmp_path / "bert", "bert")), {})
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelConfigError, match="cannot be loaded"):
        check_architecture(missing, {})
