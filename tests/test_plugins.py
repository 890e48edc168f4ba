"""What a new study, direction method, readout and dataset each touch: one module (here, this
test), registered on import; no other file of the package names it, and the config composes it.

Each toy is defined below as a user's module would define it; its test applies the registering
decorator (a module does so on import), runs it end to end on the real SmolLM2 and a few SST-2
sentences, and removes it from the registries afterwards, so no other test sees it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
from hydra.core.config_store import ConfigStore

import calibrate
from calibrate.core.direction import Direction
from calibrate.directions import METHODS, DirectionMethod, FitRequest, register_method
from calibrate.engine.lens import LogitLens
from calibrate.readouts import READOUTS, ReadoutKind, ReadoutSource, register_readout
from calibrate.studies import STUDIES, Study, StudyResult, register
from calibrate.tasks.records import sentiment_normalizer
from calibrate.tasks.registry import DATASET_SPECS, DatasetSpec, register_dataset

LEAN = ["tracker=none", "metrics.bootstrap=0", "probe.progress=false", "output.plots=false"]


@pytest.fixture(scope="module")
def lm():
    return calibrate.load_model("smollm2")


def _forget(group: str, name: str) -> None:
    ConfigStore.instance().repo.get(group, {}).pop(f"{name}.yaml", None)


# ---------------------------------------------------------------- a study

class MeanConfidenceStudy(Study):
    """A toy study: the final layer's mean confidence, on every example."""

    name = "toy_confidence"

    def run(self, ctx):
        result = ctx.probe()
        return StudyResult(ctx.report(result),
                           {"mean_confidence": float(result.probs[:, -1].max(-1).mean())})


def test_a_new_study_is_one_module(lm):
    register(MeanConfidenceStudy)
    try:
        result = calibrate.run_study(["intervention=toy_confidence", "dataset.limit=4", *LEAN],
                                     lm=lm)
        assert result.summary["mean_confidence"] == pytest.approx(
            result.report.final["confidence"], abs=1e-12)
        assert len(result.report.table) == lm.adapter.num_blocks + 1
    finally:
        STUDIES.pop("toy_confidence", None)
        _forget("intervention", "toy_confidence")


# ---------------------------------------------------------------- a direction method

@dataclass
class AxisSettings:
    """``direction.toy_axis``: which coordinate, and which way."""

    index: int = 0
    sign: float = 1.0


class Axis(DirectionMethod):
    """A toy method: one coordinate axis of the residual stream."""

    name = "toy_axis"
    Settings = AxisSettings

    def fit(self, request: FitRequest) -> Direction:
        hidden = request.loaded.adapter.unembed_weight.shape[1]
        vector = np.zeros(hidden)
        vector[request.settings.index] = request.settings.sign
        return Direction(vector, {"method": self.name, "layers": list(request.layers)})


def test_a_new_direction_method_is_one_module_with_its_settings(lm):
    register_method(Axis)
    try:
        result = calibrate.run_study(["eta=[0,2]", "direction.method=toy_axis",
                                      "direction.toy_axis.index=3", "direction.toy_axis.sign=-1",
                                      "direction.n_random=0", "dataset.limit=8", *LEAN], lm=lm)
        expected = np.zeros(lm.adapter.unembed_weight.shape[1])
        expected[3] = -1.0
        assert np.array_equal(result.direction.vector, expected)
        assert result.direction.meta["method"] == "toy_axis"
    finally:
        METHODS.pop("toy_axis", None)


# ---------------------------------------------------------------- a readout

@dataclass
class TemperedLensSettings:
    """``lens=toy_tempered``: the logit lens with every logit divided by ``temperature``."""

    name: str = "toy_tempered"
    temperature: float = 2.0


class TemperedLens(LogitLens):
    name = "toy_tempered"

    def __init__(self, adapter, temperature: float) -> None:
        super().__init__(adapter)
        self.temperature = temperature

    def option_logits(self, normed, option_ids):
        return super().option_logits(normed, option_ids) / self.temperature

    @property
    def identity(self) -> str:
        return f"{self.name}:{self.temperature}"


class Tempered(ReadoutKind):
    name = "toy_tempered"
    Settings = TemperedLensSettings

    def build(self, settings, source: ReadoutSource):
        return TemperedLens(source.loaded.adapter, settings.temperature)


def test_a_new_readout_is_one_module_and_every_layer_is_read_through_it(lm):
    register_readout(Tempered)
    try:
        plain = calibrate.run_study(["dataset.limit=4", *LEAN], lm=lm)
        tempered = calibrate.run_study(["lens=toy_tempered", "lens.temperature=4",
                                        "dataset.limit=4", *LEAN], lm=lm)
        np.testing.assert_allclose(tempered.report.result.option_logits,
                                   plain.report.result.option_logits / 4, rtol=1e-6)
    finally:
        READOUTS.pop("toy_tempered", None)
        _forget("lens", "toy_tempered")


# ---------------------------------------------------------------- a dataset

def test_a_new_dataset_is_one_registration_and_its_config(lm, tmp_path):
    rows = [{"sentence": s, "label": y} for s, y in
            [("a great film", 1), ("a dull mess", 0), ("wonderful acting", 1), ("boring", 0)]]
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    register_dataset("toy_reviews", DatasetSpec(sentiment_normalizer("sentence"),
                                                ("validation",), 2))
    ConfigStore.instance().store(group="dataset", name="toy_reviews", node={
        "name": "toy_reviews", "local_path": str(path), "split": "validation",
        "answer_format": "verbalizer", "verbalizer": [" negative", " positive"],
        "template": "Review: {question}\nSentiment:", "seed": "${seed}"})
    try:
        records = calibrate.load_dataset("toy_reviews")
        assert [(r.question, r.label) for r in records] == [(r["sentence"], r["label"])
                                                            for r in rows]
        result = calibrate.run_study(["dataset=toy_reviews", *LEAN], lm=lm)
        assert result.report.result.labels.tolist() == [1, 0, 1, 0]
    finally:
        DATASET_SPECS.pop("toy_reviews", None)
        _forget("dataset", "toy_reviews")


# ---------------------------------------------------------------- the registry helper

def test_a_second_plugin_of_a_taken_name_is_refused():
    from calibrate.plugins import add_plugin

    class First:
        name = "same"

    class Second:
        name = "same"

    registry: dict = {}
    assert add_plugin(registry, First, "toy") is First and isinstance(registry["same"], First)
    assert add_plugin(registry, First, "toy") is First  # the same class again: fine
    with pytest.raises(ValueError, match="a toy named 'same' is registered already"):
        add_plugin(registry, Second, "toy")
    assert isinstance(registry["same"], First)
