"""How the comparison figures split and name the runs: one panel per model × dataset (and η
unit), one colour per value of what varies between the runs, labelled by the overrides that
differ (bookkeeping overrides such as ``tracker=none`` never count)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from calibrate.io.compare.runs import IDENTITY_KEYS, Run, _key, _varying

# overrides that cannot change a number (config_hash leaves them out): never a label
BOOKKEEPING = ("tracker", "probe.progress", "probe.batch_size", "probe.max_batch_size",
               "probe.max_tokens", "probe.min_fill", "cache_dir", "resume", "checks", "output",
               "hydra")
STEERING_KEYS = ("eta", "direction", "intervention")  # what a steering job's unsteered curve ignores
UNITS = {"absolute": "η (absolute)", "residual_norm": "η (× mean residual norm)"}
NO_LABEL = "(same overrides)"


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _short(override: str, limit: int = 24) -> str:
    """``dataset.local_path=../shared/data/rt`` -> ``dataset.local_path=…/rt`` (a long path
    keeps its last part); ``direction.layers=[26,27,28]`` -> ``direction.layers=26-28``."""
    from calibrate.io.compare.runs import layer_range

    key, _, value = override.partition("=")
    if len(value) > limit and "/" in value:
        value = "…/" + value.rstrip("/").rsplit("/", 1)[-1]
    if key.endswith("layers") and value.startswith("[") and value.endswith("]"):
        parts = [p.strip() for p in value[1:-1].split(",")]
        if parts and all(p.isdigit() for p in parts):
            value = layer_range([int(p) for p in parts])
    return f"{key}={value}" if _ else override


def varying_labels(runs: Sequence[Run], drop: Iterable[str] = ()) -> dict[Path, str]:
    """Per run: the overrides that differ between ``runs``, without bookkeeping keys and keys
    under ``drop`` (e.g. the facet's model and dataset); ``""`` when none differ."""
    drop = (*BOOKKEEPING, *drop)
    kept = [[o for o in r.overrides if not _under(_key(o), drop)] for r in runs]
    return {r.job_dir: " ".join(_short(o) for o in parts)
            for r, parts in zip(runs, _varying(kept))}


def model_dataset(run: Run) -> str:
    """The panel of a run: ``model / dataset``."""
    parts = [str(run.row.get(k)) for k in ("model", "dataset") if run.row.get(k)]
    return " / ".join(parts) or run.job_dir.name


def eta_unit(run: Run) -> str:
    """The run's η convention: ``absolute``, ``residual_norm`` or ``unknown`` (not recorded)."""
    metrics = run.metrics or {}
    unit = metrics.get("eta_scale") or ((metrics.get("config") or {}).get("intervention")
                                        or {}).get("eta_scale")
    for override in run.overrides:
        if _key(override) == "intervention.eta_scale" and not unit:
            unit = override.split("=", 1)[1]
    return str(unit) if unit else "unknown"


def eta_axis(unit: str) -> str:
    """The x-axis label of an η unit."""
    return UNITS.get(unit, "η (unit not recorded)")


def group(runs: Iterable[Run], key) -> dict[Any, list[Run]]:
    """Runs by ``key(run)``, in sorted key order."""
    out: dict[Any, list[Run]] = {}
    for run in runs:
        out.setdefault(key(run), []).append(run)
    return dict(sorted(out.items(), key=lambda kv: str(kv[0])))


def palette(labels: Iterable[str]) -> dict[str, Any]:
    """One colour per distinct label, in first-seen order."""
    from calibrate.io.plotstyle import colours

    names = list(dict.fromkeys(labels))
    return dict(zip(names, colours(len(names))))


IDENTITY = (*IDENTITY_KEYS, "model", "dataset")


def study_of(run: Run) -> str:
    """The study a run ran (metrics.json ``study``; its ``intervention`` override, or ``probe``,
    for a run without metrics)."""
    study = (run.metrics or {}).get("study")
    if not study:
        for override in run.overrides:
            if _key(override) == "intervention":
                study = override.split("=", 1)[1]
    return str(study or "probe")


def study_labels(runs: Sequence[Run], extra_drop: Iterable[str] = ()) -> dict[Path, str]:
    """Per run: its study and the overrides that vary among the runs of that study (without
    bookkeeping, model, dataset and ``extra_drop``): ``steering: eta=0.1``, or ``probe``."""
    out: dict[Path, str] = {}
    for study, members in group(runs, study_of).items():
        labels = varying_labels(members, (*IDENTITY, "intervention", *extra_drop))
        out.update({k: f"{study}: {v}" if v else study for k, v in labels.items()})
    return out


def run_names(runs: Sequence[Run]) -> dict[Path, str]:
    """Per run: ``model × dataset · study: the overrides that vary within its study``."""
    labels = study_labels(runs)
    return {r.job_dir: f"{' × '.join(model_dataset(r).split(' / '))} · {labels[r.job_dir]}"
            for r in runs}


def facet_labels(runs: Sequence[Run], extra_drop: Iterable[str] = ()) -> Mapping[Path, str]:
    """Colour labels for runs drawn in model × dataset panels: the varying overrides without
    model, dataset and ``extra_drop``; a run with none gets :data:`NO_LABEL`."""
    labels = varying_labels(runs, (*IDENTITY, *extra_drop))
    return {k: v or NO_LABEL for k, v in labels.items()}
