"""Cheap config checks: every bad value is named in the message with what is accepted."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from conftest import composed
from omegaconf import OmegaConf

from calibrate.config.validate import (
    ConfigError,
    check_job,
    check_metrics,
    check_model,
    check_probe,
    check_tracker,
    parse_eta,
)


@pytest.fixture(scope="module")
def default_cfg() -> dict[str, Any]:
    return composed()


def with_value(cfg: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    out[key] = value
    return out


@pytest.mark.parametrize("value, expected", [
    (0, [0.0]), (2.5, [2.5]), ([0, 2, 4, 8], [0.0, 2.0, 4.0, 8.0]), ("4", [4.0]),
    ((1, "2.5"), [1.0, 2.5]), (-3, [-3.0]), ("1e-3", [0.001]),
])
def test_parse_eta_accepts(value, expected):
    got = parse_eta(value)
    assert got == expected and all(type(v) is float for v in got)


def test_parse_eta_accepts_omegaconf_list():
    assert parse_eta(OmegaConf.create({"eta": [0, 4]}).eta) == [0.0, 4.0]


@pytest.mark.parametrize("value, named", [
    ("abc", "'abc'"), (float("nan"), "nan"), (float("inf"), "inf"), ("inf", "'inf'"),
    ([], "empty list"), (True, "True"), ([1, False], "False"), ([1, "x"], "'x'"), (None, "None"),
    ({"a": 1}, "{'a': 1}"),
])
def test_parse_eta_rejects(value, named):
    with pytest.raises(ConfigError) as err:
        parse_eta(value)
    msg = str(err.value)
    assert "eta" in msg and named in msg
    if value != []:
        assert "accepted: finite numbers" in msg


PROBE_BAD = [
    ("batch_size", 0, "probe.batch_size=0", "'auto' or None or an integer >= 1"),
    ("batch_size", -4, "probe.batch_size=-4", "an integer >= 1"),
    ("batch_size", "many", "probe.batch_size='many'", "'auto'"),
    ("batch_size", True, "probe.batch_size=True", "an integer >= 1"),
    ("max_batch_size", 2.5, "probe.max_batch_size=2.5", "an integer >= 1"),
    ("max_tokens", -1, "probe.max_tokens=-1", "an integer >= 1"),
    ("min_fill", 1.5, "probe.min_fill=1.5", "a number in [0, 1]"),
    ("min_fill", -0.1, "probe.min_fill=-0.1", "a number in [0, 1]"),
    ("min_fill", "0.5", "probe.min_fill='0.5'", "a number in [0, 1]"),
    ("min_fill", float("nan"), "probe.min_fill=nan", "a number in [0, 1]"),
    ("option_mass", "x", "probe.option_mass='x'", "final, all, none"),
]


@pytest.mark.parametrize("key, value, named, accepted", PROBE_BAD)
def test_check_probe_rejects(default_cfg, key, value, named, accepted):
    with pytest.raises(ConfigError, match=re.escape(named) + ".*" + re.escape(accepted)):
        check_probe(with_value(default_cfg["probe"], key, value))


@pytest.mark.parametrize("key, value", [("batch_size", "auto"), ("batch_size", None),
                                        ("batch_size", 8), ("min_fill", 0), ("min_fill", 1.0),
                                        ("option_mass", "all"), ("option_mass", "none")])
def test_check_probe_accepts(default_cfg, key, value):
    check_probe(with_value(default_cfg["probe"], key, value))


@pytest.mark.parametrize("key, value, named, accepted", [
    ("n_bins", 0, "metrics.n_bins=0", "an integer >= 1"),
    ("n_bins", "15", "metrics.n_bins='15'", "an integer >= 1"),
    ("extra_bins", [10, 0], "metrics.extra_bins[]=0", "an integer >= 1"),
    ("binning", "x", "metrics.binning='x'", "guo, torchmetrics"),
])
def test_check_metrics_rejects(default_cfg, key, value, named, accepted):
    with pytest.raises(ConfigError, match=re.escape(named) + ".*" + re.escape(accepted)):
        check_metrics(with_value(default_cfg["metrics"], key, value))


@pytest.mark.parametrize("key, value, named, accepted", [
    ("dtype", "float8", "model.dtype='float8'", "auto, float32, bfloat16, float16"),
    ("device", "tpu", "model.device='tpu'", "auto, cpu, cuda, cuda:N"),
    ("device", "gpu0", "model.device='gpu0'", "auto, cpu, cuda, cuda:N"),
])
def test_check_model_rejects(default_cfg, key, value, named, accepted):
    with pytest.raises(ConfigError, match=re.escape(named) + ".*" + re.escape(accepted)):
        check_model(with_value(default_cfg["model"], key, value))


def test_check_model_needs_path_or_offline(default_cfg):
    cfg = {**default_cfg["model"], "path": None, "offline": None}
    with pytest.raises(ConfigError, match="'smollm2' has no model.path and no offline copy"):
        check_model(cfg)
    check_model({**cfg, "path": "HuggingFaceTB/SmolLM2-135M-Instruct"})


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16", "float16"])
def test_check_model_accepts(default_cfg, device, dtype):
    check_model({**default_cfg["model"], "device": device, "dtype": dtype})


def test_check_tracker(default_cfg):
    tracker = default_cfg["tracker"]
    assert tracker["name"] == "wandb"
    check_tracker(tracker)
    check_tracker({"name": "none"})
    with pytest.raises(ConfigError, match=re.escape("tracker='mlflow'") + ".*wandb, none"):
        check_tracker({**tracker, "name": "mlflow"})
    with pytest.raises(ConfigError,
                       match=re.escape("tracker.mode='x'") + ".*offline, online, disabled"):
        check_tracker({**tracker, "mode": "x"})
    for mode in ("offline", "online", "disabled"):
        check_tracker({**tracker, "mode": mode})


def test_check_job_accepts_composed_default(default_cfg):
    check_job(default_cfg)


@pytest.mark.parametrize("overrides", [["model=gemma3_270m", "dataset=mmlu", "tracker=none"],
                                       ["dataset=arc_challenge", "probe.batch_size=4"],
                                       ["++eta=[0,2,4,8]"], ["++eta=2.5"]])
def test_check_job_accepts_other_compositions(overrides):
    check_job(composed(*overrides))


@pytest.mark.parametrize("override, named", [
    ("probe.batch_size=0", "probe.batch_size=0"),
    ("metrics.binning=x", "metrics.binning='x'"),
    ("model.device=tpu", "model.device='tpu'"),
    ("tracker.mode=x", "tracker.mode='x'"),
    ("++eta=abc", "eta='abc'"),
    ("++eta=[1,nan]", "eta=nan"),
])
def test_check_job_rejects_composed_overrides(override, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        check_job(composed(override))


@pytest.mark.parametrize("block, key, value, named, accepted", [
    ("gradient", "lr", -1, "lr=-1", "> 0"),
    ("gradient", "objective", "hinge", "objective='hinge'", "nll, brier, soft_ece"),
    ("gradient", "holdout_fraction", 1.0, "holdout_fraction=1.0", "in [0, 1)"),
    ("gradient", "max_norm", 0, "max_norm=0", "null or > 0"),
    ("gradient", "steps", 5, "unknown keys ['steps']", "objective"),
    ("probe", "c", 0, "direction.probe.c=0", "a number > 0"),
    ("probe", "layer", -2, "direction.probe.layer=-2", "null or a layer index >= 0"),
])
def test_direction_method_blocks_are_checked_before_any_work(default_cfg, block, key, value,
                                                             named, accepted):
    direction = {**default_cfg["direction"]}
    direction[block] = {**direction[block], key: value}
    with pytest.raises(ConfigError, match=re.escape(named) + ".*" + re.escape(accepted)):
        check_job({**default_cfg, "direction": direction})


@pytest.mark.parametrize("value, named, accepted", [
    ({"shots": -1}, "direction.source_prompt.shots=-1", "an integer >= 0"),
    ({"shot": 1}, "direction.source_prompt.shot is not a prompt key", "prompt.shots"),
    ("five", "direction.source_prompt='five'", "null or a mapping"),
])
def test_source_prompt_is_checked_before_any_work(default_cfg, value, named, accepted):
    direction = {**default_cfg["direction"], "source_prompt": value}
    with pytest.raises(ConfigError, match=re.escape(named) + ".*" + re.escape(accepted)):
        check_job({**default_cfg, "direction": direction})
