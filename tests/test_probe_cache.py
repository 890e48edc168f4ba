"""The probe result cache: what the weight fingerprint sees (and, documented, what it does not),
which inputs change the key, a disk round trip, damaged entries ignored and rebuilt, no pickle;
unwritable caches (probe and null space) warned about once, entry modes that follow the umask."""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import tempfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import build_tiny
from safetensors import SafetensorError
from torch import nn

from calibrate.core import nullspace as ns
from calibrate.core.option_scores import option_probabilities
from calibrate.engine import cache as probe_cache
from calibrate.engine.probe import ProbeSettings, run_probe
from calibrate.io import nullspace_cache, results
from calibrate.model import identity as models
from calibrate.model.load import wrap_model
from calibrate.tasks.prompts import PromptConfig, PromptSet, build_prompts

DATASET = PromptConfig(name="toy", answer_format="verbalizer", verbalizer=[" negative", " positive"],
                       template="{question} \n question : is this sentence positive or negative ? "
                                "answer :")
SENTENCES = ["the movie was great", "a very boring film", "this film is not good , it was bad",
             "fun", "the the the movie was very very fun and good good"]
SAMPLE = models._SAMPLE_BYTES


@pytest.fixture(autouse=True)
def empty_memory():
    """Every test starts (and leaves) with no in-memory entry."""
    probe_cache._MEMORY.clear()
    yield
    probe_cache._MEMORY.clear()


@pytest.fixture(scope="module")
def loaded(word_tokenizer):
    return wrap_model(build_tiny("llama", len(word_tokenizer)), word_tokenizer, name="tiny-llama")


def prompts(tokenizer) -> PromptSet:
    recs = [SimpleNamespace(question=s, options=("bad", "good"), label=i % 2, subject="")
            for i, s in enumerate(SENTENCES)]
    return build_prompts(recs, DATASET, tokenizer)


# ---------------------------------------------------------------- weights_fingerprint


class Big(nn.Module):
    """One float32 vector of 100k elements (400 kB): longer than the two 64 KiB samples."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(100_000))


def fingerprint_after(module: nn.Module, index: int, value: float = 1.0) -> str:
    with torch.no_grad():
        module.weight.view(-1)[index] = value
    return probe_cache.weights_fingerprint(module)


def test_fingerprint_equal_for_identical_models(word_tokenizer):
    a = build_tiny("llama", len(word_tokenizer), seed=0)
    b = build_tiny("llama", len(word_tokenizer), seed=0)
    c = build_tiny("llama", len(word_tokenizer), seed=1)
    assert probe_cache.weights_fingerprint(a) == probe_cache.weights_fingerprint(b)
    assert probe_cache.weights_fingerprint(a) != probe_cache.weights_fingerprint(c)


def test_fingerprint_changes_with_one_weight_element(word_tokenizer):
    model = build_tiny("llama", len(word_tokenizer), seed=0)
    before = probe_cache.weights_fingerprint(model)
    with torch.no_grad():  # a small tensor lies wholly in the sampled bytes: any element counts
        param = model.model.layers[1].mlp.down_proj.weight
        param.view(-1)[param.numel() // 2] += 1e-3
    assert probe_cache.weights_fingerprint(model) != before


def test_fingerprint_of_a_large_tensor_samples_head_and_tail():
    module = Big()
    elements = SAMPLE // 4  # float32 elements in one 64 KiB sample
    base = probe_cache.weights_fingerprint(module)
    assert fingerprint_after(Big(), 10) != base  # in the first 64 KiB
    assert fingerprint_after(Big(), elements - 1) != base  # last element of the head sample
    assert fingerprint_after(Big(), 100_000 - elements) != base  # first element of the tail sample
    assert fingerprint_after(Big(), 99_999) != base  # the very last element
    # Documented limitation (see weights_fingerprint's docstring): only the first and last 64 KiB
    # of each tensor are hashed, so an edit confined to the middle of a large tensor keeps the
    # fingerprint. Any real fine-tune or re-quantization also changes the sampled bytes.
    assert fingerprint_after(Big(), 50_000) == base
    assert fingerprint_after(Big(), elements) == base  # first element past the head sample
    assert probe_cache.weights_fingerprint(module) == base


def test_fingerprint_sees_shape_dtype_and_name():
    base = probe_cache.weights_fingerprint(Big())
    as_double = Big().double()
    assert probe_cache.weights_fingerprint(as_double) != base
    reshaped = Big()
    reshaped.weight = nn.Parameter(torch.zeros(1000, 100))  # same bytes, another shape
    assert probe_cache.weights_fingerprint(reshaped) != base
    renamed = nn.Module()
    renamed.other = nn.Parameter(torch.zeros(100_000))
    assert probe_cache.weights_fingerprint(renamed) != base


def test_fingerprint_of_empty_half_precision_tensors():
    module = nn.Module()
    module.register_buffer("empty", torch.zeros(0, dtype=torch.bfloat16))
    module.register_buffer("full", torch.ones(3, dtype=torch.bfloat16))
    other = nn.Module()
    other.register_buffer("empty", torch.zeros(0, dtype=torch.bfloat16))
    other.register_buffer("full", torch.full((3,), 2.0, dtype=torch.bfloat16))
    assert probe_cache.weights_fingerprint(module) != probe_cache.weights_fingerprint(other)


# ---------------------------------------------------------------- probe_key


def test_key_changes_with_every_input(word_tokenizer):
    ps = prompts(word_tokenizer)
    settings = ProbeSettings().keeping((1, 3))
    key = probe_cache.probe_key("w", ps, settings)
    again = probe_cache.probe_key("w", prompts(word_tokenizer), ProbeSettings().keeping((1, 3)))
    assert again == key
    edited = [*ps.prompts[:-1], ps.prompts[-1] + " "]  # one trailing space
    changed = {
        "weights": probe_cache.probe_key("w2", ps, settings),
        "prompts": probe_cache.probe_key("w", replace(ps, prompts=edited), settings),
        "prompt order": probe_cache.probe_key("w", replace(ps, prompts=ps.prompts[::-1]), settings),
        "labels": probe_cache.probe_key("w", replace(ps, labels=1 - ps.labels), settings),
        "option ids": probe_cache.probe_key(
            "w", replace(ps, option_ids=ps.option_ids[:, ::-1].copy()), settings),
        "keep_layers": probe_cache.probe_key("w", ps, ProbeSettings().keeping((1, 2, 3))),
        "no keep_layers": probe_cache.probe_key("w", ps, ProbeSettings()),
        "option_mass": probe_cache.probe_key(
            "w", ps, ProbeSettings(option_mass="all").keeping((1, 3))),
        "readout": probe_cache.probe_key("w", ps, settings, "another_readout"),
    }
    for what, other in changed.items():
        assert other != key, what
    assert len(set(changed.values())) == len(changed)
    # Batching does not change results, so it does not change the key; keep_layers is a set.
    same = ProbeSettings(batch_size=2, max_tokens=64, min_fill=0.1, progress=False,
                         prefix_reuse=False).keeping((3, 1))
    assert probe_cache.probe_key("w", ps, same) == key
    assert probe_cache.probe_key("w", ps, settings, "logit") == key  # the default readout


def test_cloze_key_sees_continuations_and_norm(word_tokenizer):
    from calibrate.tasks.data import MCRecord

    records = [MCRecord(s, ("very good fun", "bad"), i % 2) for i, s in enumerate(SENTENCES)]
    cloze = PromptConfig(name="toy", answer_format="cloze", cloze_norm="none",
                         template="{question} question : good or bad ? answer :")
    ps = build_prompts(records, cloze, word_tokenizer)
    key = probe_cache.probe_key("w", ps, ProbeSettings())
    assert probe_cache.probe_key("w", build_prompts(records, cloze, word_tokenizer),
                                 ProbeSettings()) == key
    other_text = [MCRecord(r.question, ("very good fun", "bad bad"), r.label) for r in records]
    changed = {
        # the first continuation tokens (option_ids) and prompts are the same in both
        "option text": probe_cache.probe_key("w", build_prompts(other_text, cloze, word_tokenizer),
                                             ProbeSettings()),
        "norm": probe_cache.probe_key("w", replace(ps, cloze_norm="char"), ProbeSettings()),
    }
    assert build_prompts(other_text, cloze, word_tokenizer).option_ids.tolist() == ps.option_ids.tolist()
    for what, other in changed.items():
        assert other != key, what


# ---------------------------------------------------------------- store / load


def stored(loaded, tmp_path, keep_layers=(), **settings):
    ps = prompts(loaded.tokenizer)
    s = ProbeSettings(progress=False, **settings).keeping(keep_layers)
    result = run_probe(loaded, ps, s)
    key = probe_cache.probe_key(probe_cache.weights_fingerprint(loaded.model), ps, s)
    probe_cache.store(key, result, tmp_path)
    return key, result, tmp_path / "probe" / f"{key}.npz"


def assert_same(a, b):
    np.testing.assert_array_equal(a.option_logits, b.option_logits)
    np.testing.assert_array_equal(a.probs, b.probs)
    np.testing.assert_array_equal(a.labels, b.labels)
    if a.option_mass is None:
        assert b.option_mass is None
    else:
        np.testing.assert_array_equal(a.option_mass, b.option_mass)
    assert sorted(a.residuals) == sorted(b.residuals)
    for layer in a.residuals:
        np.testing.assert_array_equal(a.residuals[layer], b.residuals[layer])
        assert a.residuals[layer].dtype == b.residuals[layer].dtype
    assert (a.real_tokens, a.computed_tokens) == (b.real_tokens, b.computed_tokens)


@pytest.mark.parametrize("mass", ["all", "none"])
def test_round_trip_through_disk(loaded, tmp_path, mass):
    key, result, path = stored(loaded, tmp_path, option_mass=mass, keep_layers=(0, 2, 3))
    assert path.is_file()
    assert probe_cache.load(key, tmp_path) is result  # the in-memory entry
    probe_cache._MEMORY.clear()
    again = probe_cache.load(key, tmp_path)  # from disk
    assert again is not result
    assert_same(result, again)
    np.testing.assert_array_equal(again.probs, option_probabilities(result.option_logits))
    assert probe_cache.load("0" * 64, tmp_path) is None
    probe_cache._MEMORY.clear()  # memory is per process, not per folder; the disk is per folder
    assert probe_cache.load(key, tmp_path / "elsewhere") is None


def damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 16] = bytes(b ^ 0xFF for b in raw[middle:middle + 16])
    path.write_bytes(bytes(raw))


def damage_empty(path: Path) -> None:
    path.write_bytes(b"")


def damage_data(path: Path) -> None:
    """A valid npz whose arrays no longer match the stored checksum."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["option_logits"] = arrays["option_logits"] + 1.0
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip, damage_empty, damage_data],
                         ids=["truncated", "flipped", "empty", "checksum"])
def test_damaged_entry_is_ignored_and_rewritten(loaded, tmp_path, damage):
    key, result, path = stored(loaded, tmp_path, keep_layers=(3,))
    probe_cache._MEMORY.clear()
    damage(path)
    assert probe_cache.load(key, tmp_path) is None
    probe_cache.store(key, result, tmp_path)  # a later store rewrites the entry
    probe_cache._MEMORY.clear()
    assert_same(result, probe_cache.load(key, tmp_path))
    assert not list(path.parent.glob(".*.tmp"))


def test_entry_under_another_key_is_ignored(loaded, tmp_path):
    key, _, path = stored(loaded, tmp_path)
    probe_cache._MEMORY.clear()
    other = "f" * 64
    path.rename(path.with_name(f"{other}.npz"))
    assert probe_cache.load(other, tmp_path) is None  # the stored key says otherwise


UNPICKLED: list[str] = []


def _record(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class Payload:
    """Unpickling calls _record: proof of whether the loader ran pickle at all."""

    def __reduce__(self):
        return (_record, ("unpickled",))


def test_object_arrays_are_not_unpickled(tmp_path):
    key = "a" * 64
    path = tmp_path / "probe" / f"{key}.npz"
    path.parent.mkdir(parents=True)
    objects = np.empty(2, dtype=object)
    objects[:] = [Payload(), Payload()]
    meta = np.frombuffer(b'{"key": "' + key.encode() + b'", "checksum": "x"}', np.uint8)
    np.savez(path, meta=meta, option_logits=objects, labels=np.array([0, 1]),
             tokens=np.array([1, 1]))
    with np.load(path, allow_pickle=True) as data:  # the file does hold a pickle ...
        assert isinstance(data["option_logits"][0], str)
    assert UNPICKLED == ["unpickled", "unpickled"]
    UNPICKLED.clear()
    assert probe_cache.load(key, tmp_path) is None  # ... which load never runs
    assert UNPICKLED == []


# ---------------------------------------------------------------- caches that cannot be written
# The probe cache and the null-space cache: a read-only, foreign or full cache folder is logged
# once per process on the "calibrate" logger and the job goes on; entries follow the umask.


@pytest.fixture
def fresh_warnings(monkeypatch):
    """No cache has been warned about yet in this process."""
    monkeypatch.setattr(results, "_WARNED_CACHES", set(), raising=False)


def _raise(err: BaseException):
    def fail(*_a, **_k):
        raise err
    return fail


def _cache_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "calibrate" and r.levelno == logging.WARNING]


UNWRITABLE = {  # where the write fails, and how
    "EACCES": ("mkstemp", PermissionError(errno.EACCES, "Permission denied")),
    "EROFS": ("mkdir", OSError(errno.EROFS, "Read-only file system")),
    "ENOSPC": ("fsync", OSError(errno.ENOSPC, "No space left on device")),
    "EDQUOT": ("fsync", OSError(errno.EDQUOT, "Disk quota exceeded")),
}


def _break_writes(monkeypatch, where: str, err: OSError) -> None:
    if where == "mkstemp":
        monkeypatch.setattr(tempfile, "mkstemp", _raise(err))
    elif where == "mkdir":
        monkeypatch.setattr(Path, "mkdir", _raise(err))
    else:
        monkeypatch.setattr(results.os, "fsync", _raise(err))


@pytest.mark.parametrize("case", sorted(UNWRITABLE))
def test_unwritable_probe_cache_warns_once_and_goes_on(loaded, tmp_path, monkeypatch, caplog,
                                                       fresh_warnings, case):
    where, err = UNWRITABLE[case]
    ps = prompts(loaded.tokenizer)
    settings = ProbeSettings(progress=False)
    result = run_probe(loaded, ps, settings)
    key = probe_cache.probe_key(probe_cache.weights_fingerprint(loaded.model), ps, settings)
    _break_writes(monkeypatch, where, err)
    caplog.set_level(logging.WARNING, logger="calibrate")
    probe_cache.store(key, result, tmp_path)  # no exception
    (message,) = _cache_warnings(caplog)
    assert message == (f"cache {tmp_path / 'probe'} is not writable ({err.strerror}); "
                       "going on without caching")
    assert probe_cache.load(key, tmp_path) is result  # the in-memory entry still serves the sweep
    probe_cache.store("b" * 64, result, tmp_path)  # a second failure: no second warning
    assert len(_cache_warnings(caplog)) == 1
    monkeypatch.undo()
    assert not (tmp_path / "probe").exists() or not list((tmp_path / "probe").iterdir())


def test_probe_cache_other_errors_still_raise(loaded, tmp_path, monkeypatch, fresh_warnings):
    ps = prompts(loaded.tokenizer)
    result = run_probe(loaded, ps, ProbeSettings(progress=False))
    monkeypatch.setattr(results.os, "fsync", _raise(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError, match="Input/output"):
        probe_cache.store("c" * 64, result, tmp_path)


@pytest.mark.parametrize("case", sorted(UNWRITABLE))
def test_unwritable_nullspace_cache_warns_once_and_goes_on(tmp_path, monkeypatch, caplog,
                                                           fresh_warnings, case):
    where, err = UNWRITABLE[case]
    weight = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    want = ns.null_space(weight, 2)
    if where == "fsync":  # safetensors writes the file itself; it reports only "os error N"
        monkeypatch.setattr(nullspace_cache, "save_file", _raise(SafetensorError(
            f"Error while serializing: I/O error: {err.strerror} (os error {err.errno})")))
    else:
        _break_writes(monkeypatch, where, err)
    caplog.set_level(logging.WARNING, logger="calibrate")
    got = nullspace_cache.cached_null_space(weight, 2, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    (message,) = _cache_warnings(caplog)
    assert message == (f"cache {tmp_path / nullspace_cache.CACHE_SUBDIR} is not writable ({err.strerror}); "
                       "going on without caching")
    other = nullspace_cache.cached_null_space(weight * 2, 2, tmp_path)  # fails again, silently
    assert other[0].shape == (8, 2) and len(_cache_warnings(caplog)) == 1
    monkeypatch.undo()
    folder = tmp_path / nullspace_cache.CACHE_SUBDIR
    assert not folder.exists() or list(folder.iterdir()) == []  # no entry, no temp file


def test_both_caches_follow_the_umask(loaded, tmp_path):
    ps = prompts(loaded.tokenizer)
    result = run_probe(loaded, ps, ProbeSettings(progress=False))
    for mask in (0o022, 0o002):
        old = os.umask(mask)
        try:
            cache = tmp_path / f"cache{mask:o}"
            probe_cache.store("d" * 64, result, cache)
            nullspace_cache.cached_null_space(torch.randn(40, 8), 2, cache)
            entries = [cache / "probe" / f"{'d' * 64}.npz", *(cache / nullspace_cache.CACHE_SUBDIR).iterdir()]
        finally:
            os.umask(old)
        assert len(entries) == 2
        for entry in entries:
            assert stat.S_IMODE(entry.stat().st_mode) == {0o022: 0o644, 0o002: 0o664}[mask], entry


# ---------------------------------------------------------------- the job's cache is keyed by weights

@pytest.mark.parametrize("same_memory", [True, False], ids=["memory", "disk"])
def test_same_config_name_other_weights_is_a_miss(word_tokenizer, tmp_path, same_memory):
    """A sweep over model.path=A,B (one config name): B must never get A's probabilities."""
    from calibrate.job import cached_probe

    a = wrap_model(build_tiny("llama", len(word_tokenizer), seed=1), word_tokenizer, name="smollm2")
    b = wrap_model(build_tiny("llama", len(word_tokenizer), seed=2), word_tokenizer, name="smollm2")
    ps = prompts(word_tokenizer)
    probe_cfg = ProbeSettings(batch_size="auto", max_batch_size=8, max_tokens=512, min_fill=0.0,
                              option_mass="final", progress=False)
    first = cached_probe(a, ps, probe_cfg, (), tmp_path)
    if not same_memory:
        probe_cache._MEMORY.clear()
    second = cached_probe(b, ps, probe_cfg, (), tmp_path)
    own = run_probe(b, ps, probe_cfg)
    np.testing.assert_allclose(second.probs, own.probs, atol=1e-6)
    assert not np.allclose(first.probs, second.probs, atol=1e-4)
    # the same weights in another dtype are another entry too
    c = wrap_model(build_tiny("llama", len(word_tokenizer), seed=1).to(torch.bfloat16),
                   word_tokenizer, name="smollm2")
    assert c.identity()["fingerprint"] != a.identity()["fingerprint"]
    third = cached_probe(c, ps, probe_cfg, (), tmp_path)
    assert third is not first
