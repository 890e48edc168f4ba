"""The notebook API: the same names as the configs, no Hydra run and no files unless asked.

The nouns: :func:`load_model`, :func:`load_dataset`, :func:`probe_layers`, :func:`fit_direction`
(any registered method), :func:`steer` (a context manager), :func:`null_space` and
:func:`run_study` (any study from config overrides). The examples below run in the tests.

    >>> import calibrate
    >>> lm = calibrate.load_model("smollm2")
    >>> records = calibrate.load_dataset("sst2", limit=8)
    >>> report = calibrate.probe_layers(lm, records, dataset="sst2")
    >>> report.table[["layer", "accuracy", "ece", "mce"]].shape   # one row per layer
    (31, 4)
    >>> report.result.probs.shape                                 # example x layer x option
    (8, 31, 2)
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

import calibrate.studies  # noqa: F401 - the studies' intervention options
from calibrate import job
from calibrate.config import compose as composing
from calibrate.config.schema import Config
from calibrate.errors import UserError
from calibrate.model import load as models
from calibrate.model import transformerlens
from calibrate.tasks import data


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The job config exactly as the CLI would compose it (``conf/config.yaml`` + overrides)."""
    return composing.compose(overrides)


def typed_config(overrides: Sequence[str] = ()) -> Config:
    """:func:`compose`, typed and checked: the tree every function below the entry points takes."""
    return composing.typed(compose(overrides))


def _group_choices(name: str, group: str, error: type[UserError]) -> None:
    """Refuse a config name that the ``group`` does not hold, listing the ones it does."""
    choices = composing.group_options(group)
    if name not in choices:
        raise error(f"unknown {group} {name!r}; accepted: {', '.join(choices)}")


def _group(name: str, group: str, overrides: Sequence[str], error: type[UserError]) -> Config:
    _group_choices(name, group, error)
    return typed_config([f"{group}={name}", *overrides])


def load_model(name: str, **values: Any) -> models.LoadedModel:
    """Load a model by its config name (``smollm2``, ``phi2``, ...); keyword args override keys."""
    config = _group(name, "model", [f"model.{k}={_literal(v)}" for k, v in values.items()],
                    models.ModelConfigError)
    return models.load_model(config.model, config.cache_dir)


def use_model(model: Any, tokenizer: Any = None, name: str | None = None) -> models.LoadedModel:
    """A model already loaded in your code, as calibrate reads it: a transformers causal LM (any
    dtype, device or ``device_map``) with its tokenizer, an nnsight ``LanguageModel`` (its
    underlying transformers model and tokenizer) or a TransformerLens ``TransformerBridge`` with
    the model's own weights (its transformers model rebuilt from the bridge's tensors, no copy;
    a bridge whose weights ``enable_compatibility_mode()`` processed is refused). It goes through
    the same architecture adapter and carries the same identity (weights fingerprint, unembedding
    hash) as a model calibrate loads itself.

    >>> import calibrate, transformers
    >>> folder = calibrate.load_model("smollm2").source
    >>> hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    >>> tok = transformers.AutoTokenizer.from_pretrained(folder)
    >>> lm = calibrate.use_model(hf, tok, name="smollm2")
    >>> lm.fingerprint == calibrate.load_model("smollm2").fingerprint
    True
    """
    inner = vars(model).get("_module") if hasattr(model, "__dict__") else None
    if inner is not None and type(model).__module__.startswith("nnsight"):  # an nnsight model
        tokenizer = tokenizer or vars(model).get("tokenizer") or getattr(model, "tokenizer", None)
        model = inner
    elif transformerlens.is_transformerlens(model):
        model, tokenizer = transformerlens.unwrap_bridge(model, tokenizer)
    if tokenizer is None:
        raise models.ModelConfigError("use_model() needs the model's tokenizer (tokenizer=...); "
                                      "accepted: the tokenizer the model was trained with")
    source = getattr(getattr(model, "config", None), "_name_or_path", None) or name or "custom"
    return models.wrap_model(model, tokenizer, name=name or str(source), source=str(source))


def dataset_config(name: str, **values: Any) -> Any:
    """The typed config of a dataset by name, with keyword overrides (e.g. ``limit=100``)."""
    overrides = [f"dataset.{k}={_literal(v)}" for k, v in values.items()]
    return _group(name, "dataset", overrides, data.DatasetError).dataset


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
    _group_choices(dataset, "dataset", data.DatasetError)
    check_records_dataset(records, dataset)
    config = typed_config([f"dataset={dataset}", *overrides,
                           *(f"dataset.{k}={_literal(v)}" for k, v in dataset_values.items())])
    return job.probe_records(lm, records, config.dataset, config.probe, config.metrics)


def _literal(value: Any) -> str:
    """A Python value as a Hydra override value (strings quoted, so text stays text)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return repr(value)


# ---------------------------------------------------------------- directions, steering, studies

def _context(lm: models.LoadedModel, records: Sequence[data.MCRecord], dataset: str,
             overrides: Sequence[str]):
    """A job context for ``lm`` on ``records`` (no files), as a study receives it."""
    from calibrate.config.spec import build_spec
    from calibrate.studies.job_context import JobContext
    from calibrate.tasks.prompts import build_prompts

    _group_choices(dataset, "dataset", data.DatasetError)
    check_records_dataset(records, dataset)
    spec = build_spec(compose([f"dataset={dataset}", *overrides]))
    return JobContext(spec, lm, build_prompts(records, spec.dataset, lm.tokenizer,
                                              style=spec.prompt))


def fit_direction(lm: models.LoadedModel, records: Sequence[data.MCRecord], dataset: str = "sst2",
                  method: str = "layer_diff", layers: Sequence[int] | None = None,
                  overrides: Sequence[str] = ()):
    """Fit a calibration direction ĉ on the calibration split of ``records`` with any registered
    method (:data:`calibrate.directions.fit.DIRECTION_METHODS`); ``layers`` default to the
    model config's ``direction_layers``.

    >>> import calibrate
    >>> lm = calibrate.load_model("smollm2")
    >>> records = calibrate.load_dataset("sst2", limit=8)
    >>> c_hat = calibrate.fit_direction(lm, records, dataset="sst2", layers=[29, 30])
    >>> c_hat.hidden, round(float((c_hat.vector ** 2).sum()), 6), c_hat.meta["layers"]
    (576, 1.0, [29, 30])
    """
    from calibrate.directions.fit import obtain_direction

    extra = ["intervention=steering", f"direction.method={method}"]
    if layers is not None:
        extra.append(f"direction.layers={_literal(list(layers))}")
    ctx = _context(lm, records, dataset, [*extra, *overrides])
    return obtain_direction(ctx, ctx.edit_layers()).direction


@contextmanager
def steer(lm: models.LoadedModel, direction: Any, eta: float,
          layers: Sequence[int] | None = None, position: str = "last",
          eta_scale: str = "absolute", records: Sequence[data.MCRecord] | None = None,
          dataset: str = "sst2"):
    """Add ``eta * direction`` to the residual after ``layers`` (default: the last layer) for
    every forward pass inside the block; the hooks are removed in ``finally``. ``position``:
    ``last`` edits each pass's last position (prompts are left-padded), ``all`` every position.
    ``eta_scale="residual_norm"`` puts η in units of the mean residual norm at each edited layer
    (measured at the last position on ``records`` of ``dataset``), as the CLI's
    ``intervention.eta_scale`` does; the handle's ``scale`` says by what each layer's η was
    multiplied. While a steer block is active, cached probe results are bypassed.

    >>> import calibrate
    >>> lm = calibrate.load_model("smollm2")
    >>> records = calibrate.load_dataset("sst2", limit=8)
    >>> c_hat = calibrate.fit_direction(lm, records, dataset="sst2")
    >>> plain = calibrate.probe_layers(lm, records, dataset="sst2").table["ece"].iloc[-1]
    >>> with calibrate.steer(lm, c_hat, eta=40.0) as edit:
    ...     steered = calibrate.probe_layers(lm, records, dataset="sst2").table["ece"].iloc[-1]
    >>> edit.layers, bool(steered != plain), lm.edits
    ([30], True, [])
    """
    import torch

    from calibrate.directions.files import checked_vector
    from calibrate.engine.edits import check_steering
    from calibrate.engine.hooks import edit_residual

    num_layers = lm.adapter.num_blocks + 1
    chosen = check_steering(list(layers) if layers else [num_layers - 1], num_layers, position,
                            eta_scale)
    vector, _ = checked_vector(getattr(direction, "vector", direction),
                               lm.adapter.unembed_weight.shape[1], "steer(direction=...)")
    scale = {layer: 1.0 for layer in chosen}
    if eta_scale == "residual_norm":
        scale = _residual_norms(lm, records, dataset, chosen)

    def edit(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        shift = (float(eta) * scale[layer] * torch.as_tensor(vector)).to(hidden.device,
                                                                          hidden.dtype)
        if position == "all":
            return hidden + shift
        out = hidden.clone()
        out[:, -1] = out[:, -1] + shift
        return out

    handle = SteerHandle(chosen, float(eta), position, eta_scale, scale)
    edits = lm.__dict__.setdefault("edits", [])  # active edits: result caches step aside
    edits.append(handle)
    try:
        with edit_residual(lm.adapter, chosen, edit):
            yield handle
    finally:
        edits.remove(handle)


@dataclass
class SteerHandle:
    """What an active :func:`steer` block edits."""

    layers: list[int]
    eta: float
    position: str
    eta_scale: str = "absolute"
    scale: dict[int, float] | None = None  # η's multiplier per layer (1: absolute units)


def _residual_norms(lm: models.LoadedModel, records: Sequence[data.MCRecord] | None,
                    dataset: str, layers: Sequence[int]) -> dict[int, float]:
    """Mean last-position residual norm at each of ``layers`` on ``records``."""
    from calibrate.engine.edits import SteeringError, residual_norms
    from calibrate.studies.job_context import cached_probe
    from calibrate.tasks.prompts import build_prompts

    if not records:
        raise SteeringError("steer(eta_scale='residual_norm') needs records=... (the examples "
                            "the residual norm is measured on); accepted: a non-empty list")
    config = typed_config([f"dataset={dataset}"])
    prompt_set = build_prompts(records, config.dataset, lm.tokenizer)
    result = cached_probe(lm, prompt_set, config.probe, layers, config.cache_dir)
    return residual_norms(result.residuals, layers)


def split_records(records: Sequence[data.MCRecord], overrides: Sequence[str] = ()
                  ) -> tuple[list[data.MCRecord], list[data.MCRecord]]:
    """(calibration, evaluation) records of the CLI's seeded split (``direction.seed``,
    ``direction.calibration_fraction`` of ``overrides``): fit on the first, measure the
    second, as a steering job does.

    >>> import calibrate
    >>> records = calibrate.load_dataset("sst2", limit=8)
    >>> cal, evaluation = calibrate.split_records(records)
    >>> len(cal), len(evaluation), set(cal).isdisjoint(evaluation)
    (4, 4, True)
    """
    from calibrate.core.direction import split_indices

    settings = typed_config(list(overrides)).direction
    cal, evaluation = split_indices(len(records), settings.calibration_fraction, settings.seed)
    return [records[i] for i in cal], [records[i] for i in evaluation]


def null_space(lm: models.LoadedModel, k: int | None = None, fraction: float = 0.01):
    """U_k: the bottom-k left singular vectors of the model's own unembedding (hidden × k), and
    the singular values; k = round(fraction × hidden) unless given.

    >>> import calibrate
    >>> lm = calibrate.load_model("smollm2")
    >>> basis, values = calibrate.null_space(lm, k=6)       # the 6 smallest, ascending
    >>> tuple(basis.shape), bool((values[:-1] <= values[1:]).all())
    ((576, 6), True)
    """
    from calibrate.core import nullspace

    hidden = lm.adapter.unembed_weight.shape[1]
    k = nullspace.resolve_k(hidden, k, None if k is not None else fraction)
    return nullspace.null_space(lm.adapter.unembed_weight.detach().cpu(), k)


def run_study(overrides: Sequence[str] = (), job_dir: str | Path | None = None,
              lm: models.LoadedModel | None = None):
    """Run any study from config overrides, as the CLI would (``study`` decided by the spec).
    With ``job_dir`` the job writes its files and returns its metrics summary; without, the
    typed :class:`~calibrate.studies.study.StudyResult` is returned and nothing is written.

    >>> import calibrate
    >>> result = calibrate.run_study(["dataset.limit=8", "eta=[0,4]", "tracker=none"])
    >>> type(result).__name__, sorted(result.table["eta"].unique().tolist())
    ('SteeringResult', [0.0, 4.0])
    """
    from calibrate.config.spec import build_spec
    from calibrate.studies import get_study
    from calibrate.studies.job_context import JobContext

    spec = build_spec(compose(list(overrides)))
    if job_dir is not None:
        return job.run_job(spec, Path(job_dir))
    if lm is None:
        ctx = job.prepare(spec)
    else:
        from calibrate.tasks.prompts import build_prompts
        from calibrate.tasks.shots import load_with_exemplars

        records, exemplars = load_with_exemplars(spec.dataset, spec.prompt, spec.cache_dir)
        ctx = JobContext(spec, lm, build_prompts(records, spec.dataset, lm.tokenizer,
                                                 style=spec.prompt, exemplars=exemplars))
    return get_study(spec.study).run(ctx)
