"""Subspace ablations: null-space truncation and removal of the calibration direction.

``intervention=nullspace`` projects the residual at the chosen layers onto the complement of
U_k, the bottom-k left singular vectors of the model's own unembedding (zero ablation; mean
ablation keeps the calibration split's mean component instead), next to a random k-dimensional
subspace of the same size at the same layers (the control). ``intervention=direction_ablate``
removes the component along c_hat, next to a random direction. Both also report how aligned
c_hat (and each per-layer c_l) is with U_k against random unit vectors.

Outputs: ``ablation.csv`` (one row per variant and layer, deltas against no ablation) and, for
the null space, ``nullspace.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from calibrate import nullspace, results
from calibrate.assets import cache_root
from calibrate.intervene import obtain_direction
from calibrate.spec import JobSpec
from calibrate.models import LoadedModel
from calibrate.probe import ProbeSettings
from calibrate.prompts import PromptSet
from calibrate.scoring import score_steered
from calibrate.steer import Intervention, steering_table

ABLATIONS = ("zero", "mean")
ABLATION_FILE = "ablation.csv"
NULLSPACE_FILE = "nullspace.json"
FILES = [ABLATION_FILE, NULLSPACE_FILE, "ablation.png"]


@dataclass(frozen=True)
class SubspaceAblation(Intervention):
    """Variant 0: unchanged; variant v >= 1: remove span(bases[v-1]) (or replace it by the mean)."""

    bases: tuple[np.ndarray, ...] = ()  # each [hidden, k], orthonormal columns
    layers: tuple[int, ...] = ()
    position: str = "last"
    means: Mapping[int, np.ndarray] | None = None  # layer -> mean residual (mean ablation)
    names: tuple[str, ...] = field(default=())

    @property
    def n_variants(self) -> int:
        return 1 + len(self.bases)

    def apply(self, layer: int, hidden: torch.Tensor, variant: torch.Tensor) -> torch.Tensor:
        out = hidden.clone()
        mean = None
        if self.means is not None:
            mean = torch.as_tensor(self.means[layer], device=hidden.device)
        for v, basis in enumerate(self.bases, start=1):
            rows = (variant == v).to(hidden.device)
            if bool(rows.any()):
                u = torch.as_tensor(basis, device=hidden.device)
                out[rows] = nullspace.truncate(hidden[rows], u, mean)
        return out


def _variant_table(cfg: Mapping[str, Any], logits: np.ndarray, labels: np.ndarray,
                   names: tuple[str, ...]) -> pd.DataFrame:
    mcfg = cfg["metrics"]
    return steering_table(logits, labels, list(names), int(mcfg["n_bins"]), str(mcfg["binning"]),
                          0, column="variant")


def final_deltas(table: pd.DataFrame, variant: str) -> dict[str, float]:
    """Final-layer deltas of one variant against no ablation."""
    rows = table[(table["variant"] == variant) & (table["layer"] == table["layer"].max())]
    row = rows.iloc[0]
    return {k: float(row[k]) for k in ("delta_accuracy", "delta_ece", "delta_mce", "changed",
                                       "accuracy", "ece", "mce")}


def _means(fit, layers: tuple[int, ...], ablation: str) -> dict[int, np.ndarray] | None:
    if ablation not in ABLATIONS:
        from calibrate.steer import SteeringError

        raise SteeringError(f"intervention.ablation={ablation!r}; accepted: {', '.join(ABLATIONS)}")
    if ablation == "zero":
        return None
    return {l: fit.base.residuals[l][fit.cal_idx].astype(np.float64).mean(axis=0) for l in layers}


def _bases(cfg: Mapping[str, Any], kind: str, loaded: LoadedModel, fit) -> tuple[dict, tuple, tuple]:
    """(report, bases, names) for the null space or the direction ablation."""
    hidden = loaded.adapter.unembed_weight.shape[1]
    ncfg = cfg["nullspace"]
    seed = int(ncfg["seed"])
    if kind == "direction_ablate":
        rand = nullspace.random_unit_vectors(1, hidden, seed)[0].numpy()
        return {}, (fit.direction.vector[:, None], rand[:, None]), ("none", "direction", "random")
    k = nullspace.resolve_k(hidden, ncfg.get("k"), ncfg.get("fraction"))
    weight = loaded.adapter.unembed_weight.detach().cpu()
    basis, sv = nullspace.cached_null_space(weight, k, cache_root(cfg.get("cache_dir")))
    per_layer = {l: torch.as_tensor(v) for l, v in fit.per_layer.items()}
    report = nullspace.alignment_report(torch.as_tensor(fit.direction.vector), basis, per_layer or None,
                                        int(ncfg["n_random"]), seed)
    report.update(fraction=ncfg.get("fraction"), singular_values=sv.tolist(),
                  ones_alignment=nullspace.ones_direction_alignment(basis),
                  unembed_hash=loaded.unembed_hash)
    control = nullspace.random_subspace(hidden, k, seed).numpy()
    return report, (basis.numpy(), control), ("none", "nullspace", "random")


def run_ablation(spec: JobSpec, loaded: LoadedModel, prompt_set: PromptSet,
                 probe, measure, settings: ProbeSettings) -> dict[str, Any]:
    """Everything but writing for ``nullspace`` and ``direction_ablate`` jobs."""
    cfg, kind, icfg = spec.config, spec.study, spec.intervention
    fit = obtain_direction(spec, loaded, prompt_set, probe, measure)
    layers = tuple(fit.job.steer_layers)
    report, bases, names = _bases(cfg, kind, loaded, fit)
    ablation = SubspaceAblation(bases=tuple(b.astype(np.float32) for b in bases), layers=layers,
                                position=icfg["position"],
                                means=_means(fit, layers, str(icfg.get("ablation", "zero"))),
                                names=names)
    eval_set = prompt_set.subset(fit.eval_idx)
    logits = score_steered(loaded, eval_set, ablation, settings, bool(icfg.get("use_cache", True)))
    table = _variant_table(cfg, logits, eval_set.labels, names)
    report.update(direction_raw_norm=fit.direction.meta.get("raw_norm"))
    report.update(layers=list(layers), ablation=icfg.get("ablation", "zero"), position=ablation.position,
                  truncation=final_deltas(table, names[1]), random_control=final_deltas(table, names[2]))
    return {"fit": fit, "table": table, "report": report, "kind": kind, "eval_set": eval_set,
            "base_eval": fit.base.take(fit.eval_idx)}


def write_ablation(out: Mapping[str, Any], job_dir: Path, title: str, plots: bool) -> dict[str, Path]:
    """Write ablation.csv, nullspace.json (null space only) and a plot of the variants."""
    results.write_csv(Path(job_dir) / ABLATION_FILE, out["table"])
    if out["kind"] == "nullspace":
        results.write_json(Path(job_dir) / NULLSPACE_FILE, out["report"])
    if not plots:
        return {}
    from calibrate.plots import plot_overlay

    table = out["table"]
    per_variant = {v: table[table["variant"] == v] for v in table["variant"].unique()}
    return {"ablation": plot_overlay(per_variant, "ece", Path(job_dir) / "ablation.png",
                                     f"{title}: ECE per layer, {out['kind']} ablation vs control")}
