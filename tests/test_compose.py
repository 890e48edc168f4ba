"""The one place the config tree is read (calibrate/config/compose.py): composition as the CLI
composes, the study an ``eta`` alone implies, keys no schema has refused, the typed root."""

from __future__ import annotations

import re

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf, open_dict

import calibrate.studies  # noqa: F401 - the studies' intervention options
from calibrate.config import CONF_DIR
from calibrate.config.compose import (
    STEERING,
    compose,
    compose_typed,
    group_options,
    implied_overrides,
    typed,
    unknown_keys,
)
from calibrate.config.schema import CheckSettings, Config
from calibrate.core.metrics import MetricSettings
from calibrate.engine.edits import InterventionSettings
from calibrate.engine.probe import ProbeSettings
from calibrate.errors import ConfigError
from calibrate.model.config import ModelConfig
from calibrate.tasks.dataset_config import DatasetConfig
from calibrate.tasks.shots import PromptStyle

# ---------------------------------------------------------------- eta alone means steering

@pytest.mark.parametrize("overrides, implied", [
    (["eta=4"], ["intervention=steering", "eta=4"]),
    (["dataset=mmlu", "eta=[0,2]"], ["intervention=steering", "dataset=mmlu", "eta=[0,2]"]),
    (["++eta=2"], ["intervention=steering", "++eta=2"]),  # the key, whatever the prefix
    (["eta=4", "intervention=nullspace"], ["eta=4", "intervention=nullspace"]),
    (["eta=4", "experiment=eta_sweep"], ["eta=4", "experiment=eta_sweep"]),
    (["+intervention=probe", "eta=1"], ["+intervention=probe", "eta=1"]),
    (["dataset=mmlu"], ["dataset=mmlu"]),  # no eta: nothing implied
    (["direction.eta_like=1"], ["direction.eta_like=1"]),  # only the top-level key `eta`
    ([], []),
])
def test_implied_overrides(overrides, implied):
    assert STEERING == "steering"
    assert implied_overrides(overrides) == implied


def test_eta_alone_composes_the_steering_study():
    cfg = compose(["eta=2"])
    assert cfg.intervention.name == "steering" and cfg.eta == 2
    assert compose([]).intervention.name == "probe" and compose([]).eta is None
    # the steering study's keys set on the same line, without +
    assert compose(["eta=2", "intervention.layers=[3]"]).intervention.layers == [3]
    # a study chosen on the line wins
    assert compose(["eta=2", "intervention=nullspace"]).intervention.name == "nullspace"


def test_compose_returns_the_job_config():
    cfg = compose(["dataset=mmlu", "seed=3"])
    assert isinstance(cfg, DictConfig) and "hydra" not in cfg  # as the CLI's job sees it
    assert cfg.dataset.name == "mmlu" and cfg.dataset.seed == 3  # ${seed} resolves
    assert OmegaConf.get_type(cfg.dataset) is DatasetConfig  # a structured node: typed keys


# ---------------------------------------------------------------- unknown keys

@pytest.mark.parametrize("override, key, group, accepted", [
    ("+dataset.foo=1", "dataset.foo", "dataset", "name, split, limit, shuffle, seed"),
    ("+probe.batchsize=4", "probe.batchsize", "probe", "batch_size, max_batch_size, max_tokens"),
    ("+model.dtypes=float32", "model.dtypes", "model", "name, path, offline, revision, dtype"),
    ("+intervention.layer=[3]", "intervention.layer", "intervention",
     "name, layers, position, eta_scale, ablation, use_cache"),
    ("+direction.gradient.steps=5", "direction.gradient.steps", "direction.gradient",
     "objective, layer, max_norm"),
    ("+checks.edit_ratio=5", "checks.edit_ratio", "checks",
     "edit_ratio_warn, max_chars_per_token"),
])
def test_a_key_added_with_plus_is_refused_by_typed(override, key, group, accepted):
    cfg = compose([override])  # Hydra adds it ...
    assert unknown_keys(cfg) == [key]
    with pytest.raises(ConfigError) as err:  # ... the typed tree refuses it
        typed(cfg)
    assert str(err.value).startswith(f"{key} is not a config key (also when added with +); "
                                     f"accepted keys of {group}: {accepted}")


def test_a_top_level_key_added_with_plus_is_refused():
    cfg = compose(["+etas=[1,2]"])
    assert unknown_keys(cfg) == ["etas"]
    with pytest.raises(ConfigError, match=r"^etas is not a config key \(also when added with \+\); "
                                          r"accepted keys of the config: model, dataset, "):
        typed(cfg)


@pytest.mark.parametrize("override", ["dataset.foo=1", "probe.batchsize=4", "checks.ratio=2"])
def test_an_unknown_key_without_plus_is_refused_while_composing(override):
    with pytest.raises(ConfigCompositionException, match=re.escape(override.split("=")[0])):
        compose([override])


def test_the_default_tree_has_no_unknown_key():
    for overrides in ([], ["eta=2"], ["intervention=nullspace"], ["model=gemma3_270m"]):
        assert unknown_keys(compose(overrides)) == []


def test_typed_needs_a_job_config_without_its_hydra_node():
    cfg = compose([])
    with open_dict(cfg):
        cfg.hydra = {"job": {"name": "x"}}
    assert unknown_keys(cfg) == []  # the hydra node is not a key of the schema's
    with pytest.raises(ValueError, match="without its hydra node"):
        typed(cfg)


# ---------------------------------------------------------------- typed objects

def _job(overrides=()) -> DictConfig:
    return compose(list(overrides))


def test_typed_builds_every_group_as_its_owners_dataclass():
    config = typed(_job(["dataset=mmlu", "probe.batch_size=4", "metrics.n_bins=10", "seed=2"]))
    assert isinstance(config, Config)
    assert isinstance(config.model, ModelConfig) and config.model.name == "smollm2"
    assert isinstance(config.dataset, DatasetConfig) and config.dataset.seed == 2
    assert isinstance(config.probe, ProbeSettings) and config.probe.batch_size == 4
    assert isinstance(config.metrics, MetricSettings) and config.metrics.n_bins == 10
    assert config.metrics.extra_bins == (10,)  # a list in YAML, a tuple once typed
    assert isinstance(config.prompt, PromptStyle) and config.prompt == PromptStyle(0, False, 2)
    assert isinstance(config.intervention, InterventionSettings)
    assert config.intervention == InterventionSettings(name="probe")
    assert config.checks == CheckSettings(100.0, 64.0)
    assert config.probe.batch_size == 4 and typed(_job()).probe.batch_size is None  # auto


def test_typed_runs_every_groups_own_checks():
    with pytest.raises(ConfigError, match=r"probe.batch_size=0; accepted: auto or an integer >= 1"):
        typed(_job(["probe.batch_size=0"]))
    with pytest.raises(ConfigError, match=r"checks.max_chars_per_token=0.0; accepted: a number > 0"):
        typed(_job(["checks.max_chars_per_token=0"]))
    with pytest.raises(ConfigError, match=r"seed=-2; accepted: an integer >= 0"):
        typed(_job(["seed=-2"]))


def test_compose_typed_is_both():
    cfg, config = compose_typed(["dataset=copa"])
    assert cfg.dataset.name == "copa" and config.dataset.name == "copa"
    assert isinstance(config, Config) and "hydra" not in cfg


# ---------------------------------------------------------------- group options

def test_group_options_are_files_and_stored_nodes():
    assert group_options("intervention") == ["baselines", "direction_ablate", "neurons",
                                             "nullspace", "probe", "steering"]  # registered, no files
    assert not (CONF_DIR / "intervention").exists()
    assert "logit" in group_options("lens")
    assert group_options("model") == sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    assert group_options("no_such_group") == []
