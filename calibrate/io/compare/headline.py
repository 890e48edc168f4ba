"""The tables a reader sees first: a headline that fits a screen (one row per complete run, at
most ten columns, markdown lines of at most 120 characters), then detail tables (final-layer
metrics with intervals, phases, steering per η, null-space controls, the runs themselves and
the failures), every table keyed by the run number ``#``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from calibrate.io.compare.facets import eta_unit, run_names, study_of
from calibrate.io.compare.nullspace_json import nullspace_rows
from calibrate.io.compare.runs import Run
from calibrate.io.compare.tables import final_steering_rows, md_text

MAX_WIDTH = 120
MIN_TEXT = 8  # a text column is never cut below this many characters


def _num(value: Any) -> float | None:
    if isinstance(value, (bool, np.bool_)) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _f(value: Any, digits: int = 3, sign: bool = False) -> str:
    x = _num(value)
    return "" if x is None else f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _interval(lo: Any, hi: Any, sign: bool = False) -> str:
    a, b = _f(lo, sign=sign), _f(hi, sign=sign)
    return f"[{a}, {b}]" if a and b else ""


def _flag(values: Mapping[str, Any]) -> bool:
    """The ΔECE flag: after the multiple-comparisons correction where the job has it, else the
    paired interval excluding 0."""
    if "significant_adjusted_ece" in values:
        return bool(values["significant_adjusted_ece"])
    return bool(values.get("significant_ece"))


def _best_eta(run: Run) -> tuple[float, float, bool] | None:
    """(ΔECE, η, flagged) of the η with the lowest final-layer ΔECE, η ≠ 0."""
    best = None
    for eta, values in ((run.metrics or {}).get("steering") or {}).items():
        delta = _num((values or {}).get("delta_ece"))
        if _num(eta) in (None, 0.0) or delta is None:
            continue
        if best is None or delta < best[0]:
            best = (delta, float(eta), _flag(values))
    return best


def headline_table(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per complete run, grouped by study: #, its name (model × dataset · study and the
    overrides that vary within the study), N, final accuracy and ECE, the
    ECE peak and its layer, the final layer's option mass and, for steering runs, the best
    final-layer ΔECE with its η (``*``: flagged after the multiple-comparisons correction)."""
    labels = run_names([r for r in runs if r.complete])
    rows = []
    for number, run in enumerate(runs, 1):
        if not run.complete:
            continue
        m, final = run.metrics, run.metrics.get("final") or {}
        peak = _f(m.get("peak_ece"))
        best = _best_eta(run)
        rows.append({"#": number, "run": labels[run.job_dir], "_study": study_of(run),
                     "N": m.get("n_examples"),
                     "acc": _num(final.get("accuracy")), "ECE": _num(final.get("ece")),
                     "mass": _num(final.get("option_mass")),
                     "peak ECE (layer)": f"{peak} (L{m.get('peak_ece_layer')})" if peak else "",
                     "best ΔECE (η)": "" if best is None else
                     f"{best[0]:+.3f}{'*' if best[2] else ''} (η={best[1]:g})"})
    table = pd.DataFrame(rows)
    if not len(table):
        return table
    return table.sort_values("_study", kind="stable", ignore_index=True).drop(columns="_study")


def _final_table(runs: Sequence[Run]) -> pd.DataFrame:
    rows = []
    for number, run in enumerate(runs, 1):
        if run.complete:
            f = run.metrics.get("final") or {}
            rows.append({"#": number, "acc": _num(f.get("accuracy")),
                         "acc 95 %": _interval(f.get("accuracy_lo"), f.get("accuracy_hi")),
                         "ECE": _num(f.get("ece")),
                         "ECE interval": _interval(f.get("ece_lo"), f.get("ece_hi")),
                         "MCE": _num(f.get("mce")), "option mass": _num(f.get("option_mass")),
                         "NLL": _num(f.get("nll")),
                         "Brier": _num(f.get("brier")), "smECE": _num(f.get("smece")),
                         "AURC": _num(f.get("aurc"))})
    return pd.DataFrame(rows).dropna(axis=1, how="all")


def _phase_table(runs: Sequence[Run]) -> pd.DataFrame:
    keys = ("num_layers", "plateau_layer", "peak_ece_layer", "peak_ece", "emergence_layer",
            "phase_kind")
    rows = [{"#": n, **{k: r.metrics.get(k) for k in keys}} for n, r in enumerate(runs, 1)
            if r.complete]
    return pd.DataFrame(rows)


def _steering_table(runs: Sequence[Run]) -> pd.DataFrame:
    rows = []
    for number, run in enumerate(runs, 1):
        table = final_steering_rows(run) if run.steering else None
        if table is None:
            continue
        null = run.table("null.csv")
        nulls = {} if null is None or "eta" not in null else \
            {float(r["eta"]): r for r in null.to_dict("records")}
        temperature = ((run.metrics.get("baselines") or {}).get("temperature") or {}).get("ece")
        per_eta = run.metrics.get("steering") or {}
        for rec in table.to_dict("records"):
            eta = float(rec["eta"])
            if eta == 0.0:
                continue
            mark = "*" if _flag(rec) else ""
            own, n = per_eta.get(f"{eta:g}") or {}, nulls.get(eta, {})
            rows.append({"#": number, "η": f"{eta:g}", "unit": eta_unit(run),
                         "ΔECE": _num(rec.get("delta_ece")),
                         "ΔECE interval": _interval(rec.get("delta_ece_lo"),
                                                    rec.get("delta_ece_hi"), True) + mark,
                         "p adj.": _num(rec.get("p_adjusted_ece")),
                         "Δacc": _num(rec.get("delta_accuracy")),
                         "ΔMCE": _num(rec.get("delta_mce")),
                         "null ΔECE": _num(n.get("null_delta_ece_median")),
                         "p": _num(n.get("p_value_ece")),
                         "p matched": _num(n.get("p_matched_ece")),
                         "n random": _num(n.get("n_random")),
                         "T(η)": _num(own.get("temperature")),
                         "KL left": _num(own.get("residual_kl")),
                         "ECE": _num(rec.get("ece")), "temp. ECE": _num(temperature)})
    return pd.DataFrame(rows).dropna(axis=1, how="all")


def _seeds_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Steering results over the runs that differ only in their seed (:mod:`.seeds`)."""
    from calibrate.io.compare.seeds import seed_rows

    table = seed_rows(runs)
    if not len(table):
        return table
    rows = []
    for rec in table.to_dict("records"):
        rows.append({"model": rec["model"], "dataset": rec["dataset"],
                     "η": rec["eta_label"], "seeds": rec["seeds"],
                     "ΔECE mean": rec.get("delta_ece_mean"), "ΔECE sd": rec.get("delta_ece_sd"),
                     "ΔECE min": rec.get("delta_ece_min"), "ΔECE max": rec.get("delta_ece_max"),
                     "sign": rec["sign"],
                     "flagged": f"{rec['flagged_adjusted']}/{rec['seeds']}",
                     "p matched (max)": rec.get("p_matched_ece_max"),
                     "T(η)": rec.get("temperature_mean"),
                     "best baseline ΔECE": rec.get("best_baseline_delta_ece_mean")})
    return pd.DataFrame(rows).dropna(axis=1, how="all")


def _nullspace_table(runs: Sequence[Run]) -> pd.DataFrame:
    keep = ("k", "rho", "p_value", "delta_ece", "random_delta_ece", "delta_mce",
            "random_delta_mce")
    rows = [{"#": n, **{k: row.get(k) for k in keep}}
            for n, run in enumerate(runs, 1) for row in nullspace_rows(run)]
    return pd.DataFrame(rows).dropna(axis=1, how="all")


def _runs_table(runs: Sequence[Run]) -> pd.DataFrame:
    return pd.DataFrame([{"#": n, "sweep": r.sweep, "job": r.job_dir.name,
                          "status": r.row.get("status"), "overrides": " ".join(r.overrides),
                          "config_hash": r.row.get("config_hash"), "path": str(r.job_dir)}
                         for n, r in enumerate(runs, 1)])


def _failed_table(runs: Sequence[Run]) -> pd.DataFrame:
    return pd.DataFrame([{"#": n, "job": r.job_dir.name, "status": r.row.get("status"),
                          "overrides": " ".join(r.overrides), "error": r.row.get("error")}
                         for n, r in enumerate(runs, 1) if not r.complete])


def detail_tables(runs: Sequence[Run]) -> dict[str, pd.DataFrame]:
    """The detail tables by title (empty ones left out), keyed by the headline's ``#``."""
    tables = {"Final layer": _final_table(runs), "Phases": _phase_table(runs),
              "Steering: final layer per η (* flagged after the multiple-comparisons "
              "correction)": _steering_table(runs),
              "Across seeds (final layer)": _seeds_table(runs),
              "Null-space truncation": _nullspace_table(runs), "Runs": _runs_table(runs),
              "Failed runs": _failed_table(runs)}
    return {title: table for title, table in tables.items() if len(table)}


# --- markdown that fits ------------------------------------------------------------------------------


def cell_text(value: Any) -> str:
    """A table cell as plain text: blank when missing, floats with 4 significant decimals."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4f}"
    return str(value.item() if isinstance(value, np.generic) else value)


def _fit(text: str, width: int) -> str:
    """``text`` as inert markdown (:func:`md_text`) of at most ``width`` characters: cut (with …)
    before escaping, so an escape is never split."""
    escaped = md_text(text)
    keep = min(len(text), width)
    while len(escaped) > width and keep > 0:
        keep -= 1
        escaped = md_text(text[:keep] + "…")
    return escaped


def fit_markdown(table: pd.DataFrame, width: int = MAX_WIDTH) -> str:
    """``table`` as a pipe table whose lines are at most ``width`` characters, every cell and
    header escaped (:func:`md_text`): the widest text column is cut (with …) until it fits;
    columns that still do not fit go into a continuation table keyed by the first column."""
    cells = [[cell_text(v) for v in row] for row in table.itertuples(index=False, name=None)]
    header = [str(c) for c in table.columns]
    least = [len(md_text(h)) for h in header]
    widths = [max([least[j], *(len(md_text(r[j])) for r in cells)]) for j in range(len(header))]
    numeric = [pd.api.types.is_numeric_dtype(table[c]) for c in table.columns]
    while sum(widths) + 3 * len(widths) + 1 > width:
        text = [j for j in range(len(widths)) if not numeric[j] and widths[j] > MIN_TEXT
                and widths[j] > least[j]]
        if not text:
            break
        j = max(text, key=lambda k: widths[k])
        widths[j] = max(MIN_TEXT, least[j], widths[j] - 1)
    used, first = 0, len(widths)
    for j, w in enumerate(widths):
        used += w + 3
        if used + 1 > width and j > 1:
            first = j
            break
    lines = _pipe(header[:first], [r[:first] for r in cells], widths[:first], numeric[:first])
    if first < len(widths):
        rest = table.iloc[:, [0, *range(first, len(widths))]]
        lines += "\n" + fit_markdown(rest, width)
    return lines


def _pipe(header: Sequence[str], rows: Sequence[Sequence[str]], widths: Sequence[int],
          numeric: Sequence[bool]) -> str:
    def line(values: Sequence[str]) -> str:
        parts = [(_fit(v, w).rjust(w) if num else _fit(v, w).ljust(w))
                 for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else "-" * (w + 2)
                          for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)]) + "\n"


def markdown_sections(tables: Mapping[str, pd.DataFrame], width: int = MAX_WIDTH) -> str:
    """``## title`` and its fitted pipe table for each table, in order."""
    return "\n".join(f"## {title}\n\n{fit_markdown(table, width)}"
                     for title, table in tables.items())
