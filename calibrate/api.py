"""The notebook API: the same names as the configs, no Hydra run and no files unless asked.

    >>> import calibrate
    >>> lm = calibrate.load_model("smollm2")
    >>> records = calibrate.load_dataset("sst2", limit=200)
    >>> report = calibrate.probe_layers(lm, records, dataset="sst2")
    >>> report.table[["layer", "accuracy", "ece", "mce"]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from calibrate import job

from calibrate.tasks import data

from calibrate.model import load as models

from calibrate.config import CONF_DIR  # noqa: E402 - the Hydra config tree


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The job config exactly as the CLI would compose it (``conf/config.yaml`` + overrides)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def _group_choices(name: str, group: str) -> None:
    """Refuse a config name that ``conf/<group>/`` does not hold."""
    choices = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    if name not in choices:
        raise data.DatasetError(f"unknown {group} {name!r}; accepted: {', '.join(choices)}") \
            if group == "dataset" else models.ModelConfigError(
                f"unknown {group} {name!r}; accepted: {', '.join(choices)}")


def _group(name: str, group: str, overrides: Sequence[str]) -> dict[str, Any]:
    _group_choices(name, group)
    cfg = compose([f"{group}={name}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def load_model(name: str, **values: Any) -> models.LoadedModel:
    """Load a model by its config name (``smollm2``, ``phi2``, ...); keyword args override keys."""
    cfg = _group(name, "model", [f"model.{k}={v}" for k, v in values.items()])
    return models.load_model(cfg["model"], cfg.get("cache_dir"))


def dataset_config(name: str, **values: Any) -> dict[str, Any]:
    """The resolved config of a dataset by name, with keyword overrides (e.g. ``limit=100``)."""
    overrides = [f"dataset.{k}={_literal(v)}" for k, v in values.items()]
    return _group(name, "dataset", overrides)["dataset"]


def load_dataset(name: str, **values: Any) -> list[data.MCRecord]:
    """Load a dataset by its config name as multiple-choice records."""
    return data.load_records(dataset_config(name, **values))


def check_records_dataset(records: Sequence[data.MCRecord], dataset: str) -> None:
    """Refuse records that a loader labelled with another dataset than ``dataset``: its template,
    answer format and options would be applied to them. Hand-built records (``dataset == ""``)
    pass."""
    found = sorted({str(getattr(r, "dataset", "") or "") for r in records} - {""})
    if not found or found == [dataset]:
        return
    counts = {name: sum(getattr(r, "dataset", "") == name for r in records) for name in found}
    shown = ", ".join(f"{n} record(s) of {name!r}" for name, n in counts.items())
    accepted = (f"records loaded for {dataset!r}, or dataset={found[0]!r}" if len(found) == 1
                else f"records of one dataset, loaded for {dataset!r}")
    raise data.DatasetError(f"probe_layers(dataset={dataset!r}) was given {shown}; "
                            f"accepted: {accepted}")


def probe_layers(lm: models.LoadedModel, records: Sequence[data.MCRecord], dataset: str = "sst2",
          overrides: Sequence[str] = (), **dataset_values: Any) -> job.ProbeReport:
    """Probe every layer of ``lm`` on ``records`` with the dataset's template and answer format.

    Records loaded for another dataset (``MCRecord.dataset``) are refused before any model work.
    """
    _group_choices(dataset, "dataset")
    check_records_dataset(records, dataset)
    cfg = OmegaConf.to_container(compose([f"dataset={dataset}", *overrides]), resolve=True)
    cfg["dataset"].update(dataset_values)
    return job.probe_records(lm, records, cfg["dataset"], cfg["probe"], cfg["metrics"])


def _literal(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    return str(value)
