"""Synthetic sweeps in the job contract (README, *What a job writes*), without a model: to try
``calibrate report`` and to test figures and tables at the sizes researchers sweep.

Run ``i`` of ``n`` is a complete steering job on one of ten model × dataset pairs (two depths),
one of five ``direction.layers`` ranges and either η unit (``intervention.eta_scale``), with
bootstrap intervals, paired intervals, the random-direction null, the post-hoc baselines and a
``nullspace.json``. The numbers are smooth made-up curves, seeded, not measurements.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from calibrate.io import results

# plain writes: a made-up sweep needs no atomic rename and no fsync (700 files for 100 runs)


def _csv(path: Path, table: pd.DataFrame) -> None:
    table.to_csv(path, index=False)


def _json(path: Path, data: dict) -> None:
    import json

    path.write_text(json.dumps(data, indent=1, default=results._json_default))

MODELS = (("smollm2", 30), ("gemma3_270m", 18))  # (name, blocks)
DATASETS = ("sst2", "arc_easy", "mmlu", "boolq", "piqa")
RANGES = ((-4, -2), (-3, -1), (-2, 0), (-6, -4), (-8, -6))  # from the last block
ETAS = {"absolute": (0.0, 0.5, 1.0, 2.0, 4.0), "residual_norm": (0.0, 0.05, 0.1, 0.2, 0.4)}
METRICS = ("accuracy", "ece", "mce")


def _plan(i: int, n: int) -> dict[str, Any]:
    pairs = 4 if n <= 20 else 10
    model, blocks = MODELS[(i % pairs) % 2]
    variant = i // pairs
    first, last = RANGES[variant % len(RANGES)]
    scale = ("absolute", "residual_norm")[(variant // len(RANGES)) % 2]
    return {"model": model, "blocks": blocks, "dataset": DATASETS[(i % pairs) // 2],
            "layers": list(range(blocks + first, blocks + last + 1)), "scale": scale}


def _layer_table(blocks: int, chance: float, rng: np.random.Generator) -> pd.DataFrame:
    depth = np.linspace(0.0, 1.0, blocks + 1)
    top = chance + rng.uniform(0.2, 0.35)
    accuracy = chance + (top - chance) / (1 + np.exp(-12 * (depth - 0.55)))
    confidence = np.clip(accuracy + 0.25 * np.sin(np.pi * depth) + rng.uniform(0.03, 0.12), 0, 1)
    ece = np.abs(confidence - accuracy) + 0.01
    table = pd.DataFrame({"layer": np.arange(blocks + 1), "accuracy": accuracy,
                          "confidence": confidence, "ece": ece, "mce": np.clip(2 * ece, 0, 1),
                          "rmsce": 1.2 * ece, "brier": 0.5 - 0.2 * accuracy,
                          "nll": 1.5 - accuracy, "entropy": 1 - confidence})
    for metric in ("accuracy", "ece"):
        table[f"{metric}_lo"] = np.clip(table[metric] - 0.04, 0, 1)
        table[f"{metric}_hi"] = np.clip(table[metric] + 0.04, 0, 1)
    return table


def _steering_table(base: pd.DataFrame, etas: tuple[float, ...], start: int,
                    strength: float) -> pd.DataFrame:
    layer = base["layer"].to_numpy()
    ref = {m: base[m].to_numpy(float) for m in METRICS}
    shift = {"ece": -0.08, "mce": -0.1, "accuracy": -0.01}
    columns: dict[str, list] = {}
    for e, eta in enumerate(etas):
        effect = np.where(layer >= start, strength * e / len(etas), 0.0)
        part: dict[str, np.ndarray] = {"eta": np.full(len(layer), eta), "layer": layer}
        part.update({m: np.clip(ref[m] + shift[m] * effect, 0, 1) for m in METRICS})
        for m in METRICS:
            delta = part[m] - ref[m]
            width = 0.02 * (eta != 0)
            part.update({f"delta_{m}": delta, f"delta_{m}_lo": delta - width,
                         f"delta_{m}_hi": delta + width,
                         f"significant_{m}": (delta - width > 0) | (delta + width < 0)})
        part["changed"] = 0.1 * effect
        for key, values in part.items():
            columns.setdefault(key, []).append(values)
    return pd.DataFrame({k: np.concatenate(v) for k, v in columns.items()})


def _null_table(steering: pd.DataFrame, etas: tuple[float, ...]) -> pd.DataFrame:
    final = steering[steering["layer"] == steering["layer"].max()]
    rows = []
    for eta in etas[1:]:
        row: dict[str, Any] = {"eta": eta, "n_random": 32}
        at = final[final["eta"] == eta].iloc[0]
        for metric in METRICS:
            row[f"c_hat_delta_{metric}"] = float(at[f"delta_{metric}"])
            row.update({f"null_delta_{metric}_median": 0.0, f"null_delta_{metric}_p05": -0.01,
                        f"null_delta_{metric}_p95": 0.012})
        row["p_value_ece"] = 1 / 33
        rows.append(row)
    return pd.DataFrame(rows)


def _baselines(base: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for method, factor in (("temperature", 0.4), ("histogram", 0.6)):
        for rec in base.to_dict("records"):
            row = {"layer": rec["layer"], "method": method, "parameter": 1.3}
            for metric in ("accuracy", "ece", "mce", "nll", "brier"):
                row[f"{metric}_before"] = rec[metric]
                row[metric] = rec[metric] * (factor if metric in ("ece", "mce") else 1.0)
            rows.append(row)
    return pd.DataFrame(rows)


def _summary(plan: dict, base: pd.DataFrame, steering: pd.DataFrame, null: pd.DataFrame,
             baselines: pd.DataFrame, etas: tuple[float, ...], index: int) -> dict[str, Any]:
    last = int(base["layer"].max())
    final = base.drop(columns="layer").iloc[-1].to_dict()
    peak = int(base["ece"].idxmax())
    per_eta = {}
    for eta in etas:
        row = steering[(steering["eta"] == eta) & (steering["layer"] == last)].iloc[0]
        per_eta[f"{eta:g}"] = {k: (bool(v) if isinstance(v, (bool, np.bool_)) else float(v))
                               for k, v in row.items() if k not in ("eta", "layer")}
    at_last = baselines[baselines["layer"] == last]
    return {
        "status": "complete", "model": plan["model"], "dataset": plan["dataset"],
        "split": "validation", "n_examples": 200, "n_options": 2, "num_layers": last + 1,
        "final": final, "plateau_layer": int(0.7 * last), "peak_ece_layer": peak,
        "peak_ece": float(base["ece"].max()), "correction_layers": list(range(peak + 1, last + 1)),
        "phase_kind": "correction", "chance_accuracy": 0.5, "emergence_layer": int(0.4 * last),
        "study": "steering", "config_hash": f"{index:016x}",
        "config": {"intervention": {"eta_scale": plan["scale"]}},
        "intervention": "steering", "etas": list(etas), "eta_scale": plan["scale"],
        "intervention_layers": [last], "position": "last",
        "direction": {"method": "layer_diff", "layers": plan["layers"], "raw_norm": 0.7,
                      "dataset": plan["dataset"]},
        "steering": per_eta, "null": {"n_random": 32, "per_eta": null.to_dict("records")},
        "baselines": {r["method"]: {k: v for k, v in r.items() if k not in ("method", "layer")}
                      for r in at_last.to_dict("records")},
        "baselines_layer": last,
    }


def write_job(job_dir: Path, index: int, n: int, seed: int = 0, nullspace: bool = True) -> Path:
    """Write synthetic run ``index`` of ``n`` into ``job_dir`` (every contract file but
    predictions.npz and the PNGs); returns ``job_dir``."""
    plan = _plan(index, n)
    pair = MODELS.index((plan["model"], plan["blocks"])) * len(DATASETS) + \
        DATASETS.index(plan["dataset"])
    rng = np.random.default_rng(seed * 100_003 + pair)  # one evaluation split per pair
    etas = ETAS[plan["scale"]]
    overrides = [f"model={plan['model']}", f"dataset={plan['dataset']}", "intervention=steering",
                 f"direction.layers=[{','.join(map(str, plan['layers']))}]",
                 f"intervention.eta_scale={plan['scale']}",
                 f"eta=[{','.join(f'{e:g}' for e in etas)}]", "tracker=none"]
    (job_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(
        OmegaConf.to_yaml(OmegaConf.create(overrides)))
    base = _layer_table(plan["blocks"], 0.5, rng)
    own = np.random.default_rng([seed, index])  # what differs between the runs of one pair
    steering = _steering_table(base, etas, min(plan["layers"]), 0.5 + own.random())
    null, baselines = _null_table(steering, etas), _baselines(base)
    _csv(job_dir / results.LAYERS_FILE, base)
    _csv(job_dir / "steering.csv", steering)
    _csv(job_dir / "null.csv", null)
    _csv(job_dir / "baselines.csv", baselines)
    if nullspace:
        _json(job_dir / "nullspace.json", {
            "k": 6, "rho": 0.3, "p_value": 0.02,
            "truncation": {"delta_ece": float(-0.02 - 0.01 * own.random()), "delta_mce": -0.04},
            "random_control": [{"delta_ece": 0.001, "delta_mce": 0.002},
                               {"delta_ece": -0.002, "delta_mce": 0.0}]})
    _json(job_dir / results.METRICS_FILE,
                       _summary(plan, base, steering, null, baselines, etas, index))
    return job_dir


def write_sweep(sweep_dir: Path, n: int, seed: int = 0, failed: int = 0,
                nullspace: bool = True, summary: bool = True) -> Path:
    """A sweep folder ``sweep_dir`` with ``n`` complete synthetic jobs (``0/`` … ``n-1/``),
    ``failed`` failed ones after them, and (with ``summary``) its ``summary.csv``; returns
    ``sweep_dir``."""
    from calibrate.io.summary import summarize_sweep

    sweep_dir = Path(sweep_dir)
    for index in range(n):
        write_job(sweep_dir / str(index), index, n, seed, nullspace)
    for k in range(failed):
        job = sweep_dir / str(n + k)
        (job / ".hydra").mkdir(parents=True, exist_ok=True)
        (job / ".hydra" / "overrides.yaml").write_text("- direction.layers=[99]\n")
        _json(job / results.ERROR_FILE, {"error_type": "DirectionError",
                                                      "error": "layer 99 is past the last layer"})
    if summary:
        summarize_sweep(sweep_dir)
    return sweep_dir
