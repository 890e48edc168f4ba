"""The job spec: the study and η decided once, the result identity, checks against the shape."""

from __future__ import annotations

import re

import pytest
from conftest import composed, spec_of
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from calibrate.api import compose
from calibrate.config import CONF_DIR
from calibrate.config.spec import (
    build_spec,
    check_shape,
    config_diff,
    config_hash,
    eta_edit_ratio,
    parse_eta,
    process_uid,
    result_config,
)
from calibrate.core.direction import DirectionError
from calibrate.engine.edits import InterventionSettings
from calibrate.errors import ConfigError
from calibrate.model.config import ModelConfigError


@pytest.mark.parametrize("overrides, study, etas", [
    ((), "probe", ()),
    (("eta=0",), "steering", (0.0,)),
    (("eta=4",), "steering", (0.0, 4.0)),
    (("eta=[8,0,2,2]",), "steering", (0.0, 8.0, 2.0)),
    (("intervention=steering",), "steering", (0.0,)),
    (("intervention=steering", "eta=[1,2]"), "steering", (0.0, 1.0, 2.0)),
    (("intervention=probe",), "probe", ()),
    (("intervention=baselines",), "baselines", ()),
    (("intervention=nullspace",), "nullspace", ()),
    (("intervention=direction_ablate",), "direction_ablate", ()),
])
def test_study_and_etas_are_decided_once(overrides, study, etas):
    spec = spec_of(*overrides)
    assert (spec.study, spec.etas) == (study, etas)
    assert spec.uses_split == (study != "probe")


def test_eta_alone_composes_the_steering_study_with_its_defaults():
    spec = spec_of("eta=2")
    assert spec.intervention == InterventionSettings(name="steering")
    assert spec.intervention == spec_of("intervention=steering").intervention
    assert (spec.intervention.name, spec.intervention.position) == ("steering", "last")
    assert spec.recorded["intervention"]["name"] == "steering"  # the study that ran is recorded
    # the steering study's settings compose on the same line, without +
    assert spec_of("eta=2", "intervention.layers=[3]").intervention.layers == (3,)


def test_every_job_of_an_eta_sweep_is_a_steering_job_on_the_same_split():
    """`-m eta=0,2,4,8`: the eta=0 job must evaluate the same split as the others."""
    specs = [spec_of(f"eta={e}") for e in (0, 2, 4, 8)]
    assert {s.study for s in specs} == {"steering"}
    assert all(s.uses_split for s in specs)
    splits = {(s.config.direction.calibration_fraction, s.config.direction.seed) for s in specs}
    assert len(splits) == 1
    assert len({s.identity for s in specs}) == 4  # different results, different identities


def test_identity_ignores_what_cannot_change_a_result():
    base = config_hash(composed())
    for override in ("tracker=none", "resume=true", "cache_dir=/elsewhere", "probe.progress=false",
                     "probe.batch_size=3", "probe.max_tokens=100", "output.plots=false",
                     "checks.edit_ratio_warn=5", "probe.prefix_reuse=false"):
        assert config_hash(composed(override)) == base, override


@pytest.mark.parametrize("override", [
    "dataset.limit=10", "model.path=/some/other/weights", "model.dtype=bfloat16", "seed=1",
    "metrics.n_bins=10", "dataset=mmlu", "model=gemma3_270m", "eta=2", "direction.method=random",
    "prompt.shots=1", "prompt.chat_template=true", "prompt.seed=5",
])
def test_identity_changes_with_what_shapes_a_result(override):
    assert config_hash(composed(override)) != config_hash(composed())


def test_config_diff_names_the_keys():
    diff = config_diff(composed("dataset.limit=10"), composed("dataset.limit=20", "tracker=none"))
    assert diff == ["dataset.limit: 10 -> 20"]


def test_result_config_drops_only_the_listed_keys():
    relevant = result_config(composed())
    assert "tracker" not in relevant and "resume" not in relevant
    assert "progress" not in relevant["probe"] and "option_mass" in relevant["probe"]
    assert relevant["model"]["name"] == "smollm2"


def test_seed_is_checked_before_anything_runs():
    with pytest.raises(ConfigCompositionException, match=r"seed=abc"):
        spec_of("seed=abc")  # the schema's type: an integer
    with pytest.raises(ConfigError, match=r"seed=-1; accepted: an integer >= 0"):
        spec_of("seed=-1")


@pytest.mark.parametrize("overrides, error, message", [
    (("intervention=steering", "intervention.layers=[99]"), ConfigError,
     r"intervention.layers=\[99\]: layer\(s\) \[99\] outside this model's 0..30"),
    (("intervention=steering", "direction.layers=[0,1]"), DirectionError,
     r"direction.layers=\[0, 1\]: layer\(s\) \[0\] outside this model's 1..30"),
    (("intervention=nullspace", "nullspace.k=577"), ConfigError,
     r"nullspace.k=577.*accepted: 0..576"),
    (("eta=[0,1]", "direction.method=gradient", "direction.gradient.layer=31"), DirectionError,
     r"direction.gradient.layer=31: outside this model's 0..30; accepted: layer numbers in 0..30"),
    (("eta=[0,1]", "direction.method=probe", "direction.probe.layer=40"), DirectionError,
     r"direction.probe.layer=40: outside this model's 0..30; accepted: layer numbers in 0..30"),
])
def test_checks_against_the_models_shape(overrides, error, message):
    spec = spec_of(*overrides)
    with pytest.raises(error, match=message):
        check_shape(spec, num_blocks=30, hidden_size=576)


def test_shape_checks_pass_for_valid_ranges():
    check_shape(spec_of("intervention=steering", "intervention.layers=[0,30]"), 30, 576)
    check_shape(spec_of("intervention=nullspace"), 30, 576)


def test_edit_ratio():
    assert eta_edit_ratio((0.0, 2.0, -8.0), None, 4.0) == pytest.approx(2.0)
    assert eta_edit_ratio((0.0, 0.5), 1000.0, 1000.0) == pytest.approx(0.5)


def test_folder_names_carry_a_per_process_token():
    cfg = OmegaConf.to_container(OmegaConf.load(
        CONF_DIR / "config.yaml"), resolve=False)
    assert "${calibrate_uid:}" in cfg["hydra"]["run"]["dir"]
    assert "${calibrate_uid:}" in cfg["hydra"]["sweep"]["dir"]
    assert process_uid() == process_uid() and len(process_uid()) == 6
    resolved = OmegaConf.create({"a": "${calibrate_uid:}"})
    assert resolved.a == process_uid()


def test_the_spec_carries_the_prompt_style_checked_before_anything_runs():
    from calibrate.errors import UserError
    from calibrate.tasks.shots import PromptStyle, PromptStyleError

    assert spec_of().prompt == PromptStyle(0, False, 0)
    spec = spec_of("dataset=mmlu", "prompt.shots=5", "prompt.chat_template=true")
    assert spec.prompt == PromptStyle(5, True, 0) and spec.relevant()["prompt"]["shots"] == 5
    for overrides, message in [
            (("prompt.shots=-1",), r"prompt.shots=-1; accepted: an integer >= 0"),
            (("dataset=mmlu", "prompt.shots=6"), r"prompt.shots=6 for mmlu.*accepted: 0..5"),
            (("dataset=mmlu", "dataset.split=dev", "prompt.shots=5"),
             r"accepted: dataset.split=validation or test")]:
        with pytest.raises(PromptStyleError, match=message):
            spec_of(*overrides)
    # booleans are parsed by OmegaConf while composing: a word that is no boolean is refused there
    for override in ("prompt.chat_template=maybe", "probe.prefix_reuse=maybe"):
        with pytest.raises(ConfigCompositionException, match=re.escape(override)) as err:
            spec_of(override)
        assert "is not a valid bool" in str(err.value.__cause__)
        assert not isinstance(err.value, UserError)


# ---------------------------------------------------------------- eta (was calibrate.config.validate)

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


# ---------------------------------------------------------------- every cheap check of a job

def test_the_composed_default_passes_every_check():
    spec = build_spec(compose([]))
    assert spec.study == "probe" and spec.recorded == composed()


@pytest.mark.parametrize("overrides", [["model=gemma3_270m", "dataset=mmlu", "tracker=none"],
                                       ["dataset=arc_challenge", "probe.batch_size=4"],
                                       ["++eta=[0,2,4,8]"], ["++eta=2.5"]])
def test_other_compositions_pass_every_check(overrides):
    spec_of(*overrides)


@pytest.mark.parametrize("override, error, named", [
    ("probe.batch_size=0", ConfigError, "probe.batch_size=0"),
    ("metrics.binning=x", ConfigError, "metrics.binning='x'"),
    ("model.device=tpu", ModelConfigError, "model.device='tpu'"),
    ("tracker.mode=x", ConfigError, "tracker.mode='x'"),
    ("++eta=abc", ConfigError, "eta='abc'"),
    ("++eta=[1,nan]", ConfigError, "eta=nan"),
])
def test_a_bad_composed_value_is_refused_by_the_spec(override, error, named):
    with pytest.raises(error, match=re.escape(named)):
        spec_of(override)


@pytest.mark.parametrize("block, key, value, named, accepted", [
    ("gradient", "lr", -1, "direction.gradient.lr=-1", "a number > 0"),
    ("gradient", "objective", "hinge", "direction.gradient.objective='hinge'",
     "nll, brier, soft_ece"),
    ("gradient", "holdout_fraction", 1.0, "direction.gradient.holdout_fraction=1.0", "in [0, 1)"),
    ("gradient", "max_norm", 0, "direction.gradient.max_norm=0", "null or a number > 0"),
    ("probe", "c", 0, "direction.probe.c=0", "a number > 0"),
    ("probe", "layer", -2, "direction.probe.layer=-2", "null or an integer >= 0"),
])
def test_direction_method_blocks_are_checked_before_any_work(block, key, value, named, accepted):
    with pytest.raises(DirectionError, match=re.escape(named) + ".*" + re.escape(accepted)):
        spec_of(f"direction.{block}.{key}={value}")


def test_an_unknown_key_of_a_method_block_is_refused_before_any_work():
    with pytest.raises(ConfigCompositionException, match="direction.gradient.steps"):
        spec_of("direction.gradient.steps=5")
    with pytest.raises(ConfigError, match=re.escape(
            "direction.gradient.steps is not a config key (also when added with +); accepted "
            "keys of direction.gradient: objective, ")):
        spec_of("+direction.gradient.steps=5")


@pytest.mark.parametrize("override, error, named", [
    ("direction.source_prompt.shots=-1", ConfigError,
     "direction.source_prompt.shots=-1; accepted: null or an integer >= 0"),
    ("direction.source_prompt={shots:-1}", ConfigError,
     "direction.source_prompt.shots=-1; accepted: null or an integer >= 0"),
    ("direction.source_prompt.chat_template=maybe", ConfigCompositionException,
     "direction.source_prompt.chat_template=maybe"),
    ("+direction.source_prompt.shot=1", ConfigError,
     ("direction.source_prompt.shot is not a config key (also when added with +); accepted keys "
      "of direction.source_prompt: shots, chat_template, seed")),
    ("direction.source_prompt={shot:1}", ConfigCompositionException, "direction.source_prompt"),
    ("direction.source_prompt=five", ConfigCompositionException,
     "direction.source_prompt=five"),
])
def test_source_prompt_is_checked_before_any_work(override, error, named):
    with pytest.raises(error, match=re.escape(named)):
        spec_of(override)


def test_source_prompt_keys_are_typed():
    from calibrate.directions.settings import SourcePrompt

    assert spec_of("direction.source_prompt={shots:2}").direction.source_prompt == \
        SourcePrompt(shots=2)
    assert spec_of("direction.source_prompt.shots=0").direction.source_prompt.given() == \
        {"shots": 0}


@pytest.mark.parametrize("key, value", [("intervention.position", "all"),
                                        ("intervention.eta_scale", "residual_norm"),
                                        ("intervention.layers", [20])])
def test_eta_alone_takes_the_steering_studys_settings_on_the_same_line(key, value):
    """Issue 23: ``eta=... intervention.position=all`` used to be refused (Hydra asked for a
    ``+``), and the ``+`` form was recorded but not run. Now the key composes, the spec runs it
    and the recorded config (metrics.json's identity) holds the same value."""
    shown = "[20]" if isinstance(value, list) else value
    spec = build_spec(compose(["eta=[0,1]", f"{key}={shown}"]))
    group, name = key.split(".")
    ran = getattr(spec.intervention, name)
    assert spec.study == "steering"
    assert (list(ran) if isinstance(value, list) else ran) == value
    assert spec.recorded[group][name] == value
    assert spec.identity != build_spec(compose(["eta=[0,1]"])).identity
