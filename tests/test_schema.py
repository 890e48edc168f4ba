"""The typed root of the config tree (calibrate/config/schema.py): the root's own keys, the
``checks`` group, the direction group with one block per registered method, the ConfigStore."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import typed
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException

from calibrate.config import schema
from calibrate.config.schema import CheckSettings, Config, root_class
from calibrate.errors import ConfigError


@pytest.mark.parametrize("key, value, message", [
    ("edit_ratio_warn", -1, "checks.edit_ratio_warn=-1; accepted: a number >= 0 (0: never warn)"),
    ("edit_ratio_warn", "5", "checks.edit_ratio_warn='5'; accepted: a number >= 0 (0: never warn)"),
    ("max_chars_per_token", 0, "checks.max_chars_per_token=0; accepted: a number > 0"),
    ("max_chars_per_token", float("inf"), "checks.max_chars_per_token=inf; accepted: a number > 0"),
])
def test_check_settings_are_checked(key, value, message):
    with pytest.raises(ConfigError) as err:
        CheckSettings(**{key: value})
    assert str(err.value) == message


def test_check_settings_defaults_and_the_composed_group():
    assert CheckSettings() == CheckSettings(100.0, 64.0)
    assert CheckSettings(edit_ratio_warn=0).edit_ratio_warn == 0  # 0: never warn
    assert typed().checks == CheckSettings()
    assert typed("checks.max_chars_per_token=8").checks.max_chars_per_token == 8.0


@pytest.mark.parametrize("kwargs, message", [
    ({"seed": -1}, "seed=-1; accepted: an integer >= 0"),
    ({"seed": 1.5}, "seed=1.5; accepted: an integer >= 0"),
    ({"resume": "off"}, "resume='off'; accepted: true, false"),
    ({"resume": 1}, "resume=1; accepted: true, false"),
    ({"cache_dir": 3}, "cache_dir=3 is a int; accepted: a string"),
])
def test_the_roots_own_keys_are_checked(kwargs, message):
    default = typed()
    base = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
    with pytest.raises(ConfigError) as err:
        type(default)(**{**base, **kwargs})
    assert str(err.value) == message


def test_booleans_on_the_command_line_are_parsed_by_omegaconf():
    assert typed("resume=off").resume is False and typed("resume=true").resume is True
    with pytest.raises(ConfigCompositionException, match="resume=maybe"):
        typed("resume=maybe")


def test_the_root_has_every_group_typed_by_its_owner():
    config = typed()
    assert isinstance(config, Config) and type(config) is root_class()
    names = {f.name for f in dataclasses.fields(root_class())}
    assert {"model", "dataset", "tracker", "intervention", "lens", "seed", "resume", "eta",
            "cache_dir", "prompt", "probe", "metrics", "phases", "baselines", "nullspace",
            "checks", "output", "direction"} == names


def test_the_direction_group_has_one_block_per_method_with_settings():
    from calibrate.core.gradient_fit import GradientSettings
    from calibrate.directions import METHODS
    from calibrate.directions.correctness_probe import ProbeDirectionSettings

    direction = typed().direction
    assert isinstance(direction.gradient, GradientSettings)
    assert isinstance(direction.probe, ProbeDirectionSettings)
    from calibrate.directions.settings import DirectionSettings

    shared = {f.name for f in dataclasses.fields(DirectionSettings)}
    assert {"method", "layers", "calibration_fraction", "seed", "source", "path",
            "allow_cross_model", "source_limit", "source_prompt", "n_random", "n_random_read",
            "n_random_pass", "null", "match", "match_tol", "match_max_factor"} <= shared
    blocks = {f.name for f in dataclasses.fields(direction)} - shared
    assert blocks == {name for name, m in METHODS.items() if m.Settings is not None}
    assert typed("direction.method=gradient").direction.method_settings() == GradientSettings()
    assert typed("direction.method=layer_diff").direction.method_settings() is None


def test_register_stores_the_root_and_the_readouts():
    schema.register()
    repo = ConfigStore.instance().repo
    assert f"{schema.SCHEMA_NAME}.yaml" in repo
    assert "logit.yaml" in repo["lens"]
    assert root_class() is root_class()  # one class per set of registered methods


def test_register_again_stores_nothing_unless_the_store_changed():
    """A second register() with the same methods and readouts leaves the stored nodes as they
    are; once something re-stores the lens group (a plug-in), register() stores again."""
    store = ConfigStore.instance()
    schema.register()
    node, lens = store.repo[f"{schema.SCHEMA_NAME}.yaml"], store.repo["lens"]["logit.yaml"]
    schema.register()
    assert store.repo[f"{schema.SCHEMA_NAME}.yaml"] is node
    assert store.repo["lens"]["logit.yaml"] is lens
    store.store(group="lens", name="logit", node={"replaced": True})
    schema.register()
    assert store.repo["lens"]["logit.yaml"] is not lens
    assert "replaced" not in store.repo["lens"]["logit.yaml"].node
    assert store.repo[f"{schema.SCHEMA_NAME}.yaml"] is not node
