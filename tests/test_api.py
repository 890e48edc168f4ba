"""The notebook API: records are checked against the dataset they are probed as."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import build_tiny

from calibrate import api
from calibrate.engine.edits import SteeringError
from calibrate.tasks.data import DatasetError, MCRecord


class Untouchable:
    """A stand-in model: any use of it fails the test (the check must come before model work)."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the model was used ({name!r}) before the records were checked")


def mmlu_file(tmp_path: Path) -> Path:
    rows = [{"question": f"q{i}", "subject": "anatomy", "choices": ["w", "x", "y", "z"],
             "answer": i} for i in range(3)]
    path = tmp_path / "mmlu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_probe_layers_refuses_records_of_another_dataset(tmp_path: Path) -> None:
    records = api.load_dataset("mmlu", local_path=str(mmlu_file(tmp_path)))
    assert [r.dataset for r in records] == ["mmlu"] * 3
    with pytest.raises(DatasetError) as err:
        api.probe_layers(Untouchable(), records, dataset="sst2")
    assert str(err.value) == ("probe_layers(dataset='sst2') was given 3 record(s) of 'mmlu'; "
                              "accepted: records loaded for 'sst2', or dataset='mmlu'")


def test_probe_layers_refuses_mixed_records_and_unknown_names(tmp_path: Path) -> None:
    mmlu = api.load_dataset("mmlu", local_path=str(mmlu_file(tmp_path)))
    sst2 = [MCRecord("fine", ("negative", "positive"), 1, dataset="sst2")]
    with pytest.raises(DatasetError, match=r"given 3 record\(s\) of 'mmlu', 1 record\(s\) of "
                                           r"'sst2'; accepted: records of one dataset, loaded "
                                           r"for 'sst2'$"):
        api.probe_layers(Untouchable(), mmlu + sst2, dataset="sst2")
    with pytest.raises(DatasetError, match=r"unknown dataset 'sst3'; accepted: .*sst2"):
        api.probe_layers(Untouchable(), sst2, dataset="sst3")


def test_probe_layers_runs_records_of_its_dataset(word_tokenizer) -> None:
    from calibrate.model.load import wrap_model

    lm = wrap_model(build_tiny("llama", len(word_tokenizer)), word_tokenizer, name="tiny-llama")
    loaded = [MCRecord("the movie was fun", ("negative", "positive"), 1, dataset="sst2"),
              MCRecord("a boring film", ("negative", "positive"), 0, dataset="sst2")]
    by_hand = [MCRecord("it was bad", ("negative", "positive"), 0)]  # no dataset: accepted
    report = api.probe_layers(lm, loaded + by_hand, dataset="sst2", overrides=["probe.progress=false"])
    assert report.result.probs.shape == (3, 4, 2)  # 3 examples, 3 blocks + embeddings, 2 options
    assert report.result.labels.tolist() == [1, 0, 0]


# ---------------------------------------------------------------- the docstring examples run

@pytest.mark.slow
def test_docstring_examples_of_the_public_api(monkeypatch, tmp_path):
    """Every example in calibrate.api's docstrings, on the real SmolLM2 (few examples)."""
    import doctest

    monkeypatch.chdir(tmp_path)
    outcome = doctest.testmod(api, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                              raise_on_error=False, verbose=False)
    assert outcome.attempted >= 20  # the examples of the module and of five functions
    assert outcome.failed == 0


def test_steer_hooks_are_removed_and_edit_only_inside(word_tokenizer):
    """The context manager adds eta * c at the chosen layer, at the last position, and leaves
    no hook behind, also when the block raises."""
    import numpy as np
    import torch

    from calibrate.model.load import wrap_model

    lm = wrap_model(build_tiny("llama", len(word_tokenizer)), word_tokenizer, name="tiny")
    ids = torch.tensor([[5, 6, 7, 8]])
    hidden = lm.model.config.hidden_size
    direction = np.zeros(hidden)
    direction[0] = 1.0

    def hooks() -> list[int]:
        return [len(b._forward_hooks) + len(b._forward_pre_hooks) for b in lm.adapter.blocks]

    with torch.inference_mode():
        plain = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    before = hooks()  # after a first pass: transformers registers its own recording hooks lazily
    with torch.inference_mode():
        with api.steer(lm, direction, eta=3.0, layers=[1]) as handle:
            edited = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        after = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    assert handle.layers == [1] and lm.edits == []
    diff = (edited - plain)[0]
    assert torch.allclose(diff[-1, 0], torch.tensor(3.0)) and torch.allclose(diff[-1, 1:], torch.zeros(hidden - 1))
    assert torch.allclose(diff[:-1], torch.zeros_like(diff[:-1]))
    assert torch.equal(after, plain)
    with pytest.raises(RuntimeError), api.steer(lm, direction, eta=1.0, position="all"):
        raise RuntimeError("inside")
    assert lm.edits == [] and hooks() == before
    # a direction given from outside is checked and scaled to unit norm: eta is in its units
    with torch.inference_mode():
        with api.steer(lm, 5 * direction, eta=3.0, layers=[1]):
            scaled = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(scaled, edited)
    from calibrate.core.direction import DirectionError

    for bad, message in ((np.zeros(hidden), "zero vector"), (np.ones(hidden + 1), "width"),
                         (np.full(hidden, np.nan), "non-finite")):
        with pytest.raises(DirectionError, match=message), api.steer(lm, bad, eta=1.0):
            pass
    assert lm.edits == [] and hooks() == before


def test_split_records_is_the_split_a_steering_job_evaluates():
    import calibrate

    records = calibrate.load_dataset("sst2", limit=12)
    cal, evaluation = calibrate.split_records(records, ["direction.seed=3"])
    result = calibrate.run_study(["eta=[0,1]", "dataset.limit=12", "direction.seed=3",
                                  "direction.n_random=0", "tracker=none", "metrics.bootstrap=0",
                                  "probe.progress=false"])
    assert result.summary["n_evaluation"] == len(evaluation) == 6
    assert result.report.result.labels.tolist() == [r.label for r in evaluation]
    assert set(cal).isdisjoint(evaluation) and len(cal) + len(evaluation) == 12


def test_steer_in_residual_norm_units_is_absolute_steering_scaled_by_the_norm():
    import calibrate
    from calibrate.api import _residual_norms

    lm = calibrate.load_model("smollm2")
    records = calibrate.load_dataset("sst2", limit=6)
    c_hat = calibrate.fit_direction(lm, records, dataset="sst2")
    norm = _residual_norms(lm, records, "sst2", [30])[30]
    with calibrate.steer(lm, c_hat, eta=0.05, eta_scale="residual_norm", records=records) as h:
        relative = calibrate.probe_layers(lm, records, dataset="sst2").result.option_logits
    with calibrate.steer(lm, c_hat, eta=0.05 * norm):
        absolute = calibrate.probe_layers(lm, records, dataset="sst2").result.option_logits
    assert h.scale == {30: norm} and norm > 100  # SmolLM2's last residual: ~1e3
    np.testing.assert_array_equal(relative, absolute)
    with pytest.raises(SteeringError, match="needs records"):
        with calibrate.steer(lm, c_hat, eta=0.05, eta_scale="residual_norm"):
            pass


@pytest.fixture(scope="module")
def own_smollm2():
    """SmolLM2 as a user's own code loads it: plain transformers from the prepared folder."""
    import transformers

    import calibrate

    folder = calibrate.load_model("smollm2").source
    return (transformers.AutoModelForCausalLM.from_pretrained(folder),
            transformers.AutoTokenizer.from_pretrained(folder))


def _probe(lm, records):
    import calibrate

    return calibrate.probe_layers(lm, records, dataset="sst2").result.option_logits


def test_a_model_loaded_in_your_code_reads_as_calibrates_own(own_smollm2):
    import calibrate

    records = calibrate.load_dataset("sst2", limit=4)
    ours = calibrate.load_model("smollm2")
    theirs = calibrate.use_model(*own_smollm2, name="smollm2")
    assert theirs.fingerprint == ours.fingerprint and theirs.unembed_hash == ours.unembed_hash
    np.testing.assert_allclose(_probe(theirs, records), _probe(ours, records), rtol=0, atol=1e-5)
    with pytest.raises(api.models.ModelConfigError, match="needs the model's tokenizer"):
        calibrate.use_model(own_smollm2[0])


def test_an_nnsight_model_reads_as_calibrates_own(own_smollm2):
    nnsight = pytest.importorskip("nnsight")  # the test extra installs it
    import calibrate

    records = calibrate.load_dataset("sst2", limit=4)
    wrapped = nnsight.LanguageModel(own_smollm2[0], tokenizer=own_smollm2[1])
    lm = calibrate.use_model(wrapped, name="smollm2")
    assert lm.model is own_smollm2[0]
    assert lm.fingerprint == calibrate.load_model("smollm2").fingerprint
    np.testing.assert_allclose(_probe(lm, records), _probe(calibrate.load_model("smollm2"),
                                                             records), rtol=0, atol=1e-5)
