"""The markdown tables of experiments/README.md, read from the committed job folders.

    python experiments/tables.py adjudicate experiments/offline_study/adjudicate/*
    python experiments/tables.py methods experiments/offline_study/methods/*
    python experiments/tables.py styles experiments/offline_study/prompt_styles/{mmlu,sst2,arc_easy}*
    python experiments/tables.py transfer experiments/offline_study/prompt_styles/transfer_*
    python experiments/tables.py seed_jobs experiments/offline_study/seeds/*      # one row per job and η
    python experiments/tables.py seeds experiments/offline_study/seeds/*          # across seeds
    python experiments/tables.py seed_baselines experiments/offline_study/seeds/* # baselines vs raw
    python experiments/tables.py best_baselines experiments/offline_study/seeds/* # the best of them
    python experiments/tables.py neurons experiments/offline_study/neurons/*
    python experiments/tables.py ablation experiments/offline_study/neurons/*

Every number comes from a job's metrics.json, steering.csv, null.csv, effects.csv,
baselines.csv or neurons.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def jobs(sweeps: list[str]) -> list[Path]:
    """Complete job folders of the sweeps, in sweep and job order."""
    out = []
    for sweep in sweeps:
        if not Path(sweep).is_dir():  # seeds/*.md beside the sweeps
            continue
        for job in sorted(Path(sweep).iterdir(), key=lambda p: (len(p.name), p.name)):
            if (job / "metrics.json").is_file():
                out.append(job)
    return out


def metrics(job: Path) -> dict:
    return json.loads((job / "metrics.json").read_text())


def final_steering(job: Path) -> pd.DataFrame:
    table = pd.read_csv(job / "steering.csv")
    return table[table["layer"] == table["layer"].max()].set_index("eta")


def fmt(x: float, digits: int = 4, sign: bool = True) -> str:
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def interval(lo: float, hi: float) -> str:
    return f"[{lo:+.3f}, {hi:+.3f}]"


def steering_cells(job: Path, eta: float) -> dict[str, str]:
    """ĉ's final-layer deltas at ``eta`` with the paired interval and the random-direction null."""
    row = final_steering(job).loc[eta]
    null_path = job / "null.csv"
    cells = {"ΔECE [paired 95 %]": f"{fmt(row['delta_ece'])} {interval(row['delta_ece_lo'], row['delta_ece_hi'])}"
             + (" *" if bool(row.get("significant_ece")) else ""),
             "Δacc": fmt(row["delta_accuracy"], 3)}
    if null_path.is_file():
        null = pd.read_csv(null_path).set_index("eta").loc[eta]
        cells["null ΔECE median [5–95 %]"] = (f"{fmt(null['null_delta_ece_median'])} "
                                             f"{interval(null['null_delta_ece_p05'], null['null_delta_ece_p95'])}")
        cells["p"] = f"{null['p_value_ece']:.2f}"
    else:
        cells["null ΔECE median [5–95 %]"] = metrics(job).get("null", {}).get("skipped", "—")
        cells["p"] = "—"
    return cells


def baseline_cells(job: Path) -> dict[str, str]:
    m = metrics(job)
    layer = m.get("baselines_layer")
    table = pd.read_csv(job / "baselines.csv")
    rows = table[table["layer"] == layer].set_index("method")
    out = {}
    if "temperature" in rows.index:
        t = rows.loc["temperature"]
        out["temperature-scaled ECE (T)"] = f"{t['ece']:.4f} ({t['parameter']:.3g})"
    if "histogram" in rows.index:
        out["histogram-binned ECE"] = f"{rows.loc['histogram', 'ece']:.4f}"
    return out


def adjudicate(sweeps: list[str]) -> pd.DataFrame:
    rows = []
    for job in jobs(sweeps):
        m = metrics(job)
        etas = [e for e in m["etas"] if e != 0]
        head = {"model": m["model"], "dataset": m["dataset"] + (" (cloze)" if m["answer_format"] == "cloze" else ""),
                "n eval": m["n_evaluation"], "ECE": f"{m['final']['ece']:.4f}", **baseline_cells(job)}
        for eta in etas:
            rows.append({**head, "η (× residual norm)": eta, **steering_cells(job, eta)})
    return pd.DataFrame(rows)


def methods(sweeps: list[str]) -> pd.DataFrame:
    rows = []
    for job in jobs(sweeps):
        m = metrics(job)
        d = m["direction"]
        meta = json.loads((job / "direction.json").read_text())
        scale = (meta.get("layer_scale") or {}).get(str(max(m["intervention_layers"])))
        fit = f"{meta['eta_fit'] / scale:.3f}" if meta.get("eta_fit") and scale else "—"
        for eta in [e for e in m["etas"] if e != 0]:
            rows.append({"model": m["model"],
                         "dataset": m["dataset"] + (" (cloze)" if m["answer_format"] == "cloze" else ""),
                         "method": d["method"], "cos(ĉ, layer_diff)": f"{d['cosine_layer_diff']:+.2f}",
                         "ρ null space": f"{d['null_space_rho']:.3f}", "η fit": fit, "η": eta,
                         **steering_cells(job, eta)})
    return pd.DataFrame(rows)


def styles(sweeps: list[str]) -> pd.DataFrame:
    rows = []
    for job in jobs(sweeps):
        m = metrics(job)
        layers = pd.read_csv(job / "layers.csv")
        best = layers.loc[layers["accuracy"].idxmax()]
        worst = layers.loc[layers["ece"].idxmax()]
        prompt = m.get("prompt") or {}
        rows.append({"model": m["model"],
                     "dataset": m["dataset"] + (" (cloze)" if m["answer_format"] == "cloze" else ""),
                     "shots": prompt.get("shots", 0), "chat": bool(prompt.get("chat_template")),
                     "n": m["n_examples"], "final acc": f"{m['final']['accuracy']:.3f}",
                     "final ECE": f"{m['final']['ece']:.3f}",
                     "best acc (layer)": f"{best['accuracy']:.3f} ({int(best['layer'])})",
                     "max ECE (layer)": f"{worst['ece']:.3f} ({int(worst['layer'])})",
                     "emergence": m.get("emergence_layer"), "phase": m.get("phase_kind"),
                     "correction layers": ", ".join(map(str, m.get("correction_layers") or [])) or "—"})
    return pd.DataFrame(rows)


def transfer(sweeps: list[str]) -> pd.DataFrame:
    rows = []
    for job in jobs(sweeps):
        m = metrics(job)
        fit = (m["direction"].get("fit_prompt") or {}).get("shots")
        for eta in [e for e in m["etas"] if e != 0]:
            rows.append({"model": m["model"], "evaluated at (shots)": (m.get("prompt") or {}).get("shots", 0),
                         "ĉ fit at (shots)": fit, "n eval": m["n_evaluation"],
                         "ECE": f"{m['final']['ece']:.4f}", "η": eta, **steering_cells(job, eta)})
    return pd.DataFrame(rows)


def _seed_records(sweeps: list[str]) -> list[dict]:
    """Per job and η ≠ 0: the seed, ĉ's final-layer row, its null row and its effects row."""
    out = []
    for job in jobs(sweeps):
        m = metrics(job)
        final = final_steering(job)
        null = pd.read_csv(job / "null.csv").set_index("eta") if (job / "null.csv").is_file() \
            else None
        effects = pd.read_csv(job / "effects.csv") if (job / "effects.csv").is_file() else None
        for eta in [e for e in m["etas"] if e != 0]:
            own = None if effects is None else \
                effects[(effects["variant"] == "c_hat") & np.isclose(effects["eta"], eta)]
            out.append({"job": job, "m": m, "eta": eta, "row": final.loc[eta],
                        "null": None if null is None else null.loc[eta],
                        "effects": effects, "own": None if own is None or own.empty else own.iloc[0]})
    return out


def _name(m: dict) -> str:
    return m["dataset"] + (" (cloze)" if m["answer_format"] == "cloze" else "")


def _eta_label(m: dict, eta: float) -> str:
    return f"{eta:.3g} (fit)" if m.get("eta_fit") is not None and np.isclose(eta, m["eta_fit"]) \
        else f"{eta:g}"


def seed_jobs(sweeps: list[str]) -> pd.DataFrame:
    """One row per job and η: ĉ's ΔECE with its paired interval (2,000 resamples) and Holm-
    adjusted p, the null's p at equal norm and at matched KL (n random), T(η) and the KL left."""
    rows = []
    for r in _seed_records(sweeps):
        m, row, null, own = r["m"], r["row"], r["null"], r["own"]
        flag = " *" if bool(row.get("significant_adjusted_ece")) else ""
        rows.append({"model": m["model"], "dataset": _name(m), "method": m["direction"]["method"],
                     "seed": m["config"]["seed"], "n eval": m["n_evaluation"],
                     "η": _eta_label(m, r["eta"]),
                     "ΔECE [paired 95 %]": f"{fmt(row['delta_ece'])} "
                                           f"{interval(row['delta_ece_lo'], row['delta_ece_hi'])}{flag}",
                     "p adj.": f"{row['p_adjusted_ece']:.3f}",
                     "Δacc": fmt(row["delta_accuracy"], 3),
                     "p equal norm": "—" if null is None else f"{null['p_value_ece']:.3f}",
                     "p matched KL": "—" if null is None or pd.isna(null.get("p_matched_ece"))
                     else f"{null['p_matched_ece']:.3f}",
                     "n random": "—" if null is None else int(null["n_random"]),
                     "T(η)": "—" if own is None else f"{own['temperature']:.4f}",
                     "KL left / KL": "—" if own is None else
                     f"{own['residual_kl']:.2e} / {own['kl']:.2e}"})
    return pd.DataFrame(rows)


def mean_sd(d: np.ndarray) -> str:
    """"+m ± sd" over seeds; one seed has no sd ("—")."""
    return f"{d.mean():+.4f} ± {d.std(ddof=1):.4f}" if len(d) > 1 else f"{d.mean():+.4f} ± —"


def seeds(sweeps: list[str]) -> pd.DataFrame:
    """Across seeds, per model × dataset × method × η (and n evaluated and n random: runs of
    other sizes or nulls are other rows): ΔECE mean ± sd and range, the sign kept, how many
    seeds flag it after Holm, the equal-norm null's lower-tail p (median and largest), the
    matched-null p (lower tail: median and largest; two-sided: median and smallest), T(η) and the
    share of the KL it leaves, ĉ's squared-norm share on its top-8 and massive coordinates."""
    groups: dict[tuple, list[dict]] = {}
    for r in _seed_records(sweeps):
        m = r["m"]
        key = (m["model"], _name(m), m["direction"]["method"],
               "fit" if m.get("eta_fit") is not None and np.isclose(r["eta"], m["eta_fit"])
               else r["eta"], m["n_evaluation"],
               0 if r["null"] is None else int(r["null"]["n_random"]))
        groups.setdefault(key, []).append(r)
    rows = []
    for (model, dataset, method, eta, _, _), rs in groups.items():
        d = np.array([r["row"]["delta_ece"] for r in rs])
        sign = "+" if (d > 0).all() else "−" if (d < 0).all() else "mixed"
        p_matched = [r["null"]["p_matched_ece"] for r in rs
                     if r["null"] is not None and not pd.isna(r["null"].get("p_matched_ece"))]
        p_two = [r["null"]["p_matched_ece_two_sided"] for r in rs if r["null"] is not None
                 and not pd.isna(r["null"].get("p_matched_ece_two_sided"))]
        p_norm = [r["null"]["p_value_ece"] for r in rs if r["null"] is not None]
        own = [r["own"] for r in rs if r["own"] is not None]
        coords = [r["m"]["direction"].get("coordinates") or {} for r in rs]
        etas = [r["eta"] for r in rs]
        rows.append({"model": model, "dataset": dataset, "method": method,
                     "η": f"{eta:g}" if eta != "fit" else f"fit ({min(etas):.3g}–{max(etas):.3g})",
                     "seeds": len(rs), "n eval": rs[0]["m"]["n_evaluation"],
                     "ΔECE mean ± sd": mean_sd(d),
                     "range": interval(d.min(), d.max()), "sign": sign,
                     "flagged (Holm)": f"{sum(bool(r['row'].get('significant_adjusted_ece')) for r in rs)}/{len(rs)}",
                     "Δacc mean": fmt(np.mean([r["row"]["delta_accuracy"] for r in rs]), 3),
                     "p equal norm median (max)": "—" if not p_norm else
                     f"{np.median(p_norm):.3f} ({max(p_norm):.3f})",
                     "p matched KL median (max)": "—" if not p_matched else
                     f"{np.median(p_matched):.3f} ({max(p_matched):.3f})",
                     "two-sided median (min)": "—" if not p_two else
                     f"{np.median(p_two):.3f} ({min(p_two):.3f})",
                     "n random": "—" if rs[0]["null"] is None else int(rs[0]["null"]["n_random"]),
                     "T(η) mean": "—" if not own else f"{np.mean([o['temperature'] for o in own]):.4f}",
                     "KL left / KL": "—" if not own else
                     f"{np.mean([o['residual_kl'] / o['kl'] for o in own if o['kl'] > 0]):.2f}",
                     "top-8 share": f"{np.mean([c.get('share_top_k', np.nan) for c in coords]):.2f}",
                     "massive share": f"{np.mean([c.get('share_massive', np.nan) for c in coords]):.2f}"})
    return pd.DataFrame(rows)


def seed_baselines(sweeps: list[str]) -> pd.DataFrame:
    """Per model × dataset × baseline (at the steered layer, the first η's job of each seed):
    ECE after, ΔECE against the raw model mean over the seeds, each seed's paired interval,
    how many seeds flag it after Holm over the methods."""
    groups: dict[tuple, dict[int, pd.DataFrame]] = {}
    for job in jobs(sweeps):
        m = metrics(job)
        if m["direction"]["method"] != "layer_diff":
            continue
        table = pd.read_csv(job / "baselines.csv")
        table = table[table["layer"] == m["baselines_layer"]]
        groups.setdefault((m["model"], _name(m), m["n_evaluation"]), {})[m["config"]["seed"]] = table
    rows = []
    for (model, dataset, n_eval), per_seed in groups.items():
        methods = per_seed[min(per_seed)]["method"].tolist()
        for method in methods:
            rs = [t[t["method"] == method].iloc[0] for t in per_seed.values()]
            d = np.array([r["delta_ece"] for r in rs])
            params = pd.to_numeric(pd.Series([r["parameter"] for r in rs]), errors="coerce")
            rows.append({"model": model, "dataset": dataset, "baseline": method,
                         "seeds": len(rs), "n eval": n_eval,
                         "parameter range": "—" if params.isna().any() else
                         f"{params.min():.3g}–{params.max():.3g}", "raw ECE mean": f"{np.mean([r['ece_before'] for r in rs]):.4f}",
                         "ECE after mean": f"{np.mean([r['ece'] for r in rs]):.4f}",
                         "ΔECE mean ± sd": mean_sd(d),
                         "paired 95 % per seed": " ".join(interval(r["delta_ece_lo"], r["delta_ece_hi"])
                                                          for r in rs),
                         "flagged (Holm)": f"{sum(bool(r['significant_adjusted_ece']) for r in rs)}/{len(rs)}",
                         "Δacc mean": fmt(np.mean([r["delta_accuracy"] for r in rs]), 3)})
    return pd.DataFrame(rows)


def best_baselines(sweeps: list[str]) -> pd.DataFrame:
    """Per model × dataset, the seed_baselines row of the baseline with the lowest mean ΔECE."""
    table = seed_baselines(sweeps)
    mean = table["ΔECE mean ± sd"].str.split(" ").str[0].astype(float)
    return table.loc[mean.groupby([table["model"], table["dataset"], table["n eval"]],
                                  sort=False).idxmin()]


def _dataset(m: dict) -> str:
    return m["dataset"] + {"cloze": " (cloze)", "letters": " (letters)"}.get(m["answer_format"], "")


def neurons(sweeps: list[str]) -> pd.DataFrame:
    """Per job of ``intervention=neurons``: the candidates from the weights and ĉ's share in
    the top candidates' span against matched random neurons."""
    rows = []
    for job in jobs(sweeps):
        m, n = metrics(job), json.loads((job / "neurons.json").read_text())
        ref, span = n["reference"], n["c_hat"]["span"]
        top = "; ".join(f"{c['block']}.{c['neuron']} ({c['norm']:.2f}, p{100 * c['norm_pct']:.0f}; "
                        f"{c['null_fraction']:.2f})" for c in n["candidates"][:3])
        rows.append({"model": m["model"], "dataset": _dataset(m), "n eval": m["n_evaluation"],
                     "k": n["k"], "neurons": n["n_neurons"],
                     "null fraction median / q99 / max": f"{ref['null_fraction']['median']:.3f} / "
                     f"{ref['null_fraction']['q99']:.3f} / {ref['null_fraction']['max']:.3f}",
                     "entropy candidates": len(n["entropy_candidates"]),
                     "top 3: block.neuron (norm, norm pct; null fraction)": top,
                     "ĉ share in top-8 span": f"{span['share']:.3f}",
                     "matched random mean [5–95 %]": f"{span['null_mean']:.3f} "
                     f"[{span['null_p05']:.3f}, {span['null_p95']:.3f}]",
                     "p": f"{span['p_value']:.3f}",
                     "max |cos(ĉ, w)|": f"{n['c_hat']['max_abs_cosine']:.2f}"})
    return pd.DataFrame(rows)


def ablation(sweeps: list[str]) -> pd.DataFrame:
    """Per job: the final-layer effect of the top candidate, the top set, the token-frequency
    set, ĉ's component and temperature scaling, total and direct, with paired intervals, the
    null's p-values and its number of draws."""
    rows = []
    for job in jobs(sweeps):
        m, n = metrics(job), json.loads((job / "neurons.json").read_text())
        first = n["candidates"][0]["arm"]
        for arm in (first, "top_set", "frequency_set", "c_hat", "temperature"):
            for effect, v in n["final"].get(arm, {}).items():
                def cell(metric: str, v=v) -> str:
                    d = v[f"delta_{metric}"]
                    if f"delta_{metric}_lo" not in v:
                        return fmt(d)
                    lo, hi = v[f"delta_{metric}_lo"], v[f"delta_{metric}_hi"]
                    flag = " *" if lo > 0 or hi < 0 else ""
                    if max(abs(d), abs(lo), abs(hi)) < 1e-3:  # too small for 3 decimals
                        return f"{d:+.1e} [{lo:+.1e}, {hi:+.1e}]{flag}"
                    return f"{fmt(d)} {interval(lo, hi)}{flag}"

                rows.append({"model": m["model"], "dataset": _dataset(m),
                             "n eval": m["n_evaluation"], "ECE": f"{m['final']['ece']:.4f}",
                             "arm": "top candidate " + first if arm == first else arm,
                             "effect": effect, "ΔECE [paired 95 %]": cell("ece"),
                             "p ECE": f"{v['p_value_ece']:.3f}" if "p_value_ece" in v else "—",
                             "Δentropy [paired 95 %]": cell("entropy"),
                             "p entropy": f"{v['p_value_entropy']:.3f}"
                             if "p_value_entropy" in v else "—",
                             "mean abs Δentropy": f"{v['abs_delta_entropy']:.1e}",
                             "p abs": f"{v['p_value_abs_entropy']:.3f}"
                             if "p_value_abs_entropy" in v else "—",
                             "null draws": int(v["n_null"]) if "n_null" in v else "—",
                             "Δacc": fmt(v["delta_accuracy"], 3),
                             "answers changed": f"{v['changed']:.3f}"})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    kind, *dirs = sys.argv[1:]
    table = {"adjudicate": adjudicate, "methods": methods, "styles": styles,
             "transfer": transfer, "seeds": seeds, "seed_jobs": seed_jobs,
             "seed_baselines": seed_baselines, "best_baselines": best_baselines,
             "neurons": neurons, "ablation": ablation}[kind](dirs)
    print(table.to_markdown(index=False))
