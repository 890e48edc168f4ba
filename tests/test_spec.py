"""The job spec: the study and η decided once, the result identity, checks against the shape."""

from __future__ import annotations

import pytest
from conftest import composed
from omegaconf import OmegaConf

from calibrate.config import CONF_DIR
from calibrate.config.settings import InterventionSettings
from calibrate.config.spec import (
    build_spec,
    check_shape,
    config_diff,
    config_hash,
    eta_edit_ratio,
    process_uid,
    result_config,
)
from calibrate.config.validate import ConfigError


@pytest.mark.parametrize("overrides, study, etas", [
    ((), "probe", ()),
    (("eta=0",), "steering", (0.0,)),
    (("eta=4",), "steering", (0.0, 4.0)),
    (("eta=[8,0,2,2]",), "steering", (0.0, 8.0, 2.0)),
    (("intervention=direction",), "steering", (0.0,)),
    (("intervention=direction", "eta=[1,2]"), "steering", (0.0, 1.0, 2.0)),
    (("intervention=nullspace",), "nullspace", ()),
    (("intervention=direction_ablate",), "direction_ablate", ()),
])
def test_study_and_etas_are_decided_once(overrides, study, etas):
    spec = build_spec(compose(*overrides))
    assert (spec.study, spec.etas) == (study, etas)
    assert spec.uses_split == (study != "probe")


def test_eta_alone_uses_the_direction_defaults_from_the_intervention_config():
    spec = build_spec(compose("eta=2"))
    direction = OmegaConf.to_container(OmegaConf.load(
        CONF_DIR / "intervention" / "direction.yaml"))
    assert spec.intervention == InterventionSettings.from_mapping(direction)
    assert (spec.intervention.name, spec.intervention.position) == ("direction", "last")


def test_every_job_of_an_eta_sweep_is_a_steering_job_on_the_same_split():
    """`-m eta=0,2,4,8`: the eta=0 job must evaluate the same split as the others."""
    specs = [build_spec(compose(f"eta={e}")) for e in (0, 2, 4, 8)]
    assert {s.study for s in specs} == {"steering"}
    assert all(s.uses_split for s in specs)
    splits = {(s.config["direction"]["calibration_fraction"], s.config["direction"]["seed"])
              for s in specs}
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
    cfg = composed()
    cfg["seed"] = "abc"
    with pytest.raises(ConfigError, match=r"seed='abc'; accepted: an integer"):
        build_spec(cfg)


@pytest.mark.parametrize("overrides, message", [
    (("intervention=direction", "intervention.layers=[99]"),
     r"intervention.layers=\[99\]: layer\(s\) \[99\] outside this model's 0..30"),
    (("intervention=direction", "direction.layers=[0,1]"),
     r"direction.layers=\[0, 1\]: layer\(s\) \[0\] outside this model's 1..30"),
    (("intervention=nullspace", "nullspace.k=577"), r"nullspace.k=577 .*accepted: 0..576"),
    (("eta=[0,1]", "direction.method=gradient", "direction.gradient.layer=31"),
     r"direction.gradient.layer=\[31\]: layer\(s\) \[31\] outside this model's 0..30"),
    (("eta=[0,1]", "direction.method=probe", "direction.probe.layer=40"),
     r"direction.probe.layer=\[40\]: layer\(s\) \[40\] outside this model's 0..30"),
])
def test_checks_against_the_models_shape(overrides, message):
    spec = build_spec(compose(*overrides))
    with pytest.raises(ConfigError, match=message):
        check_shape(spec, num_blocks=30, hidden_size=576)


def test_shape_checks_pass_for_valid_ranges():
    check_shape(build_spec(compose("intervention=direction", "intervention.layers=[0,30]")), 30, 576)
    check_shape(build_spec(compose("intervention=nullspace")), 30, 576)


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
    from calibrate.tasks.shots import PromptStyle

    assert build_spec(compose()).prompt == PromptStyle(0, False, 0)
    spec = build_spec(compose("dataset=mmlu", "prompt.shots=5", "prompt.chat_template=true"))
    assert spec.prompt == PromptStyle(5, True, 0) and spec.relevant()["prompt"]["shots"] == 5
    for overrides, message in [
            (("prompt.shots=-1",), r"prompt.shots=-1; accepted: an integer >= 0"),
            (("dataset=mmlu", "prompt.shots=6"), r"prompt.shots=6 for mmlu.*accepted: 0..5"),
            (("dataset=mmlu", "dataset.split=dev", "prompt.shots=5"),
             r"accepted: dataset.split=validation or test"),
            (("prompt.chat_template=maybe",), r"prompt.chat_template='maybe'; accepted: true, false"),
            (("probe.prefix_reuse=2",), r"probe.prefix_reuse=2; accepted: true, false")]:
        with pytest.raises(ConfigError, match=message):
            build_spec(compose(*overrides))
