"""Seeds as an axis: steering results aggregated over the runs that differ only in their seed.

A sweep over ``seed`` (``-m seed=0,1,2,3,4``) re-splits the calibration and evaluation rows,
redraws the exemplars, the random directions of the null and the bootstrap resamples. Runs are
grouped by model, dataset, η unit and their overrides without the seed keys
(:data:`SEED_KEYS`); a group with at least two distinct seeds gives one row per η: the final-layer
ΔECE's mean, standard deviation (ddof 1), minimum and maximum over the seeds, whether it keeps
its sign (``+`` every seed above 0, ``−`` every seed below, else ``mixed``), how many seeds'
ΔECE is flagged after the multiple-comparisons correction, the p-values of the null at a
matched effect and at equal norm (median and largest over the seeds, with the number of random
directions), T(η) and the KL it leaves (means), and the best post-hoc baseline's ΔECE against
the raw model (mean over the seeds, and how many seeds flag it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from calibrate.io.compare.facets import BOOKKEEPING, _under, eta_unit
from calibrate.io.compare.runs import Run, _key

SEED_KEYS = ("seed", "direction.seed", "prompt.seed", "metrics.seed", "dataset.seed",
             "nullspace.seed")


def run_seed(run: Run) -> int | None:
    """The run's ``seed`` as recorded in metrics.json's config."""
    seed = ((run.metrics or {}).get("config") or {}).get("seed")
    return int(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else None


def _group_key(run: Run) -> tuple:
    kept = sorted(o for o in run.overrides
                  if not _under(_key(o), (*BOOKKEEPING, *SEED_KEYS)))
    m = run.metrics or {}
    return (m.get("model"), m.get("dataset"), eta_unit(run), tuple(kept))


def _sign(values: np.ndarray) -> str:
    if (values > 0).all():
        return "+"
    if (values < 0).all():
        return "−"
    return "mixed"


def _stats(prefix: str, values: list[float]) -> dict[str, float]:
    x = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if not len(x):
        return {}
    return {f"{prefix}_mean": float(x.mean()),
            f"{prefix}_sd": float(x.std(ddof=1)) if len(x) > 1 else float("nan"),
            f"{prefix}_min": float(x.min()), f"{prefix}_max": float(x.max())}


def _null_rows(run: Run) -> dict[float, Mapping[str, Any]]:
    per_eta = ((run.metrics or {}).get("null") or {}).get("per_eta") or []
    return {float(r["eta"]): r for r in per_eta if "eta" in r}


def _best_baseline(run: Run) -> tuple[str, Mapping[str, Any]] | None:
    """The baseline with the lowest ECE at the steered layer (metrics.json ``baselines``)."""
    baselines = (run.metrics or {}).get("baselines") or {}
    scored = [(name, v) for name, v in baselines.items()
              if isinstance(v, Mapping) and v.get("ece") is not None]
    return min(scored, key=lambda item: item[1]["ece"]) if scored else None


FIT = "fit"


def _eta_fit(run: Run) -> float | None:
    """The η a fitted direction was steered at (``eta: fit``; metrics.json ``eta_fit``)."""
    value = (run.metrics or {}).get("eta_fit")
    return float(value) if isinstance(value, (int, float)) and f"{value:g}" in \
        (run.metrics or {}).get("steering", {}) else None


def _is_fit(run: Run, eta: float) -> bool:
    fit = _eta_fit(run)
    return fit is not None and f"{eta:g}" == f"{fit:g}"


def seed_rows(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per group of runs that differ only in their seed (two seeds or more) and η ≠ 0;
    the η each seed's fitted direction was steered at (``eta: fit``, different in every seed)
    is one row of its own, ``eta`` NaN and ``eta_label`` ``fit (lowest–highest)``."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        if run.complete and (run.metrics or {}).get("steering") and run_seed(run) is not None:
            groups[_group_key(run)].append(run)
    rows = []
    for (model, dataset, unit, overrides), members in groups.items():
        seeds = sorted({run_seed(r) for r in members})
        if len(seeds) < 2:
            continue
        members = sorted(members, key=run_seed)
        etas = sorted({float(e) for r in members for e in r.metrics["steering"]
                       if float(e) != 0 and not _is_fit(r, float(e))})
        for eta in [*etas, FIT]:
            chosen = [(r, _eta_fit(r) if eta == FIT else eta) for r in members]
            per = [(r, e, r.metrics["steering"].get(f"{e:g}")) for r, e in chosen
                   if e is not None and (eta == FIT or not _is_fit(r, e))]
            per = [(r, e, v) for r, e, v in per if v]
            if len(per) < 2:
                continue
            fitted = [e for _, e, _ in per]
            per_eta = {id(r): e for r, e, _ in per}
            per = [(r, v) for r, _, v in per]
            delta = np.array([float(v["delta_ece"]) for _, v in per])
            nulls = [_null_rows(r).get(per_eta[id(r)], {}) for r, _ in per]
            label = (f"fit ({min(fitted):.3g}–{max(fitted):.3g})" if eta == FIT
                     else f"{eta:g}")
            row: dict[str, Any] = {
                "model": model, "dataset": dataset, "unit": unit,
                "overrides": " ".join(overrides), "eta": np.nan if eta == FIT else eta,
                "eta_label": label, "seeds": len(per),
                "n_evaluation": int(np.median([r.metrics.get("n_evaluation") or 0
                                               for r, _ in per])),
                **_stats("delta_ece", list(delta)), "sign": _sign(delta),
                "flagged_adjusted": sum(bool(v.get("significant_adjusted_ece")) for _, v in per),
                "flagged_interval": sum(bool(v.get("significant_ece")) for _, v in per),
                **_stats("delta_accuracy", [v.get("delta_accuracy") for _, v in per])}
            for key in ("p_matched_ece", "p_value_ece"):
                found = [n[key] for n in nulls if n.get(key) is not None]
                if found:
                    row[f"{key}_median"] = float(np.median(found))
                    row[f"{key}_max"] = float(np.max(found))
            counts = [n.get("n_random") for n in nulls if n.get("n_random")]
            if counts:
                row["n_random"] = int(min(counts))
            for key in ("temperature", "residual_kl", "kl"):
                found = [v[key] for _, v in per if v.get(key) is not None]
                if found:
                    row[f"{key}_mean"] = float(np.mean(found))
            best = [_best_baseline(r) for r, _ in per]
            best = [b for b in best if b is not None]
            if best:
                names = sorted({name for name, _ in best})
                row["best_baseline"] = "/".join(names)
                deltas = [b.get("delta_ece") for _, b in best if b.get("delta_ece") is not None]
                row.update(_stats("best_baseline_delta_ece", deltas))
                row["best_baseline_flagged"] = sum(bool(b.get("significant_adjusted_ece"))
                                                   for _, b in best)
            rows.append(row)
    return pd.DataFrame(rows)
