"""Per-example outputs in other tools' shapes: the tidy table and lm-eval samples."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from calibrate.engine.probe import ProbeSettings, run_probe
from calibrate.io import tidy
from calibrate.tasks.prompts import PromptConfig, build_prompts

DATASET = PromptConfig(name="toy", answer_format="verbalizer", verbalizer=(" negative", " positive"),
                       template="{question} \n question : is this sentence positive or negative ? answer :")
SENTENCES = ["the movie was great", "a very boring film", "fun", "bad"]


def records():
    return [SimpleNamespace(question=s, options=("bad", "good"), label=i % 2, subject="films",
                            origin=f"row {i}") for i, s in enumerate(SENTENCES)]


def test_option_logprobs_by_hand():
    logits = np.array([[0.0, np.log(3.0)]])  # softmax over the options: 1/4, 3/4
    got = tidy.option_logprobs(logits, np.array([0.5]))  # half the vocabulary's mass on them
    np.testing.assert_allclose(got, np.log([[0.125, 0.375]]), rtol=0, atol=1e-15)


def test_samples_are_the_models_own_log_probabilities(tiny):
    """The last layer's log-likelihoods equal log_softmax of the model's own logits."""
    ps = build_prompts(records(), DATASET, tiny.tokenizer)
    res = run_probe(tiny, ps, ProbeSettings(progress=False, option_mass="final"))
    logliks = tidy.option_logprobs(res.option_logits[:, -1].astype(np.float64),
                                   res.option_mass[:, -1])
    for i, prompt in enumerate(ps.prompts):
        enc = tiny.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            own = torch.log_softmax(tiny.model(**enc).logits[0, -1].double(), -1)
        np.testing.assert_allclose(logliks[i], own[ps.option_ids[i]].numpy(), rtol=0, atol=1e-5)
    samples = tidy.lmeval_samples(ps.prompts, [[" negative", " positive"]] * 4, logliks,
                                  res.labels)
    assert [s["acc"] for s in samples] == [float(np.argmax(l) == y)
                                           for l, y in zip(logliks, res.labels)]
    first = samples[0]
    assert first["arguments"] == [[ps.prompts[0], " negative"], [ps.prompts[0], " positive"]]
    assert first["filtered_resps"] == [[float(logliks[0, 0]), None], [float(logliks[0, 1]), None]]
    assert json.loads(json.dumps(first)) == first


def test_tidy_table_has_a_row_per_example_layer_and_option(tiny):
    ps = build_prompts(records(), DATASET, tiny.tokenizer)
    res = run_probe(tiny, ps, ProbeSettings(progress=False))
    table = tidy.tidy_predictions(res.probs, res.option_logits, res.labels, ps.examples,
                                  ps.option_strings)
    n, layers, k = res.probs.shape
    assert len(table) == n * layers * k
    row = table[(table["example"] == 2) & (table["layer"] == 3) & (table["option"] == 1)].iloc[0]
    assert row["probability"] == res.probs[2, 3, 1] and row["score"] == res.option_logits[2, 3, 1]
    assert row["record"] == "row 2" and row["subject"] == "films" and row["option_text"] == "good"
    assert bool(row["is_label"]) == (res.labels[2] == 1)
    assert bool(row["predicted"]) == (res.probs[2, 3].argmax() == 1)


def test_missing_option_slots_are_left_out(tmp_path):
    probs = np.array([[[0.2, 0.8, 0.0]], [[0.1, 0.3, 0.6]]])
    scores = np.array([[[0.0, 1.4, -np.inf]], [[0.0, 1.1, 1.8]]])
    table = tidy.tidy_predictions(probs, scores, np.array([1, 2]), None, [" A", " B", " C"])
    assert table[["example", "option"]].values.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]]
    assert table["option_text"].tolist() == [" A", " B", " A", " B", " C"]
    path = tidy.write_parquet(tmp_path / "p.parquet", table)
    pd.testing.assert_frame_equal(pd.read_parquet(path), table)
