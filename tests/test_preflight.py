"""The command line is checked before Hydra runs anything: every swept value, one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra.errors import HydraException

from calibrate import preflight as pf
from calibrate.config import CONF_DIR
from calibrate.errors import ConfigError, one_line
from calibrate.tasks.data import DatasetError


def check(*argv: str) -> list[str]:
    return pf.preflight(list(argv))


def test_a_good_line_passes_unchanged():
    assert check("dataset.limit=4", "tracker=none") == ["dataset.limit=4", "tracker=none"]
    # eta without a study implies the steering study: the line gets it, as composition does
    assert check("-m", "model=smollm2,gemma3_270m", "eta=0,2") == \
        ["-m", "model=smollm2,gemma3_270m", "eta=0,2", "intervention=steering"]
    assert check("-m", "eta=0,2", "intervention=nullspace") == \
        ["-m", "eta=0,2", "intervention=nullspace"]


def test_unknown_group_option_is_one_line_naming_it_and_the_options():
    with pytest.raises(HydraException) as err:
        check("model=nosuch")
    line = one_line(err.value)
    assert "\n" not in line and "model/nosuch" in line and "smollm2" in line


def test_unknown_key_is_an_error():
    with pytest.raises(HydraException, match="nosuchkey"):
        check("nosuchkey=1")
    # added with +, Hydra would take it: the typed tree refuses it, naming the accepted keys
    with pytest.raises(ConfigError, match=r"^nosuchkey is not a config key \(also when added "
                                          r"with \+\); accepted keys of the config: model, "):
        check("+nosuchkey=1")
    with pytest.raises(ConfigError, match=r"^dataset.foo is not a config key .*accepted keys of "
                                          r"dataset: name, split"):
        check("-m", "+dataset.foo=1,2")


def test_bad_override_syntax_is_an_error():
    with pytest.raises(HydraException):
        check("dataset.limit=[1,")


def test_unknown_experiment_is_refused_not_ignored():
    with pytest.raises(ConfigError) as err:
        check("experiment=nosuch")
    assert "experiment='nosuch' does not exist" in str(err.value)
    assert "debug" in str(err.value) and "eta_sweep" in str(err.value)


def test_every_swept_value_is_checked_before_any_job():
    with pytest.raises(HydraException, match="model/nosuch"):
        check("-m", "model=smollm2,nosuch")
    with pytest.raises(ConfigError, match="eta='abc'"):
        check("-m", "eta=0,abc")
    with pytest.raises(DatasetError, match="limit 0"):
        check("-m", "dataset.limit=6,0,8")
    with pytest.raises(HydraException, match=r"seed=x: Value 'x' of type 'str' could not be "
                                             r"converted to Integer"):
        check("-m", "seed=1,x")  # the schema's type, named on the error's first line
    with pytest.raises(ConfigError, match=r"seed=-1; accepted: an integer >= 0"):
        check("-m", "seed=1,-1")


def test_a_sweep_without_multirun_says_so():
    with pytest.raises(ConfigError, match=r"model=smollm2,gemma3_270m is a sweep; add -m"):
        check("model=smollm2,gemma3_270m")


def test_hydra_modes_and_other_config_trees_are_left_to_hydra():
    assert check("--cfg", "job") == ["--cfg", "job"]
    assert check("--config-dir", "/elsewhere", "x=1") == ["--config-dir", "/elsewhere", "x=1"]


def test_bundles_leave_the_users_tracker_choice_alone():
    """Every bundle that turns tracking off does it as a default the command line overrides."""
    from calibrate.api import compose

    for path in sorted((Path(CONF_DIR) / "experiment").glob("*.yaml")):
        cfg = compose([f"experiment={path.stem}", "tracker=wandb"])
        assert cfg.tracker.name == "wandb", path.stem


@pytest.fixture
def conf_copy(tmp_path, monkeypatch):
    """A copy of calibrate/conf with a bundle that sets a group's values directly (the old way)."""
    from calibrate.config import compose as composing

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "experiment" / "sets_values.yaml").write_text(
        "# @package _global_\ntracker:\n  name: none\ndataset:\n  limit: 5\n")
    monkeypatch.setattr(composing, "CONF_DIR", conf)  # the one place the tree is read
    return conf


def test_an_experiment_never_silently_overrides_a_group_the_user_chose(conf_copy, capsys):
    argv = check("experiment=sets_values", "tracker=wandb", "dataset=sst2")
    assert argv[-1] == "tracker.name=wandb"  # the user's choice wins
    err = capsys.readouterr().err
    assert "experiment sets tracker.name='none'; your tracker=wandb wins" in err
    assert "experiment sets dataset.limit=5 on your dataset=sst2" in err  # announced, kept


def test_no_notice_without_a_conflict(conf_copy, capsys):
    assert check("experiment=sets_values") == ["experiment=sets_values"]
    assert capsys.readouterr().err == ""


def test_a_layer_range_wrong_for_one_model_of_a_sweep_is_found_before_any_job(tmp_path):
    """SmolLM2 has 30 blocks, Gemma-3-270M 18: layer 25 is refused for Gemma before the first
    job (the shapes come from the prepared offline copies' configs, no weights)."""
    with pytest.raises(ConfigError) as err:
        pf.preflight(["-m", "model=smollm2,gemma3_270m", "eta=[0,1]", "intervention.layers=[25]",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert str(err.value) == ("intervention.layers=[25]: layer(s) [25] outside this model's "
                              "0..18; accepted: layer numbers in 0..18")
    assert not (tmp_path / "sweep").exists()


def test_an_output_folder_below_a_file_is_refused_before_hydra_makes_it(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"hydra.run.dir='.*afile/out': '.*afile' is not a "
                                          r"writable folder"):
        pf.preflight([f"hydra.run.dir={tmp_path / 'afile' / 'out'}"])
