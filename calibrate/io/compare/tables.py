"""The combined tables: one row per job (``runs.csv``, ``runs.md``) and each steering job's
final-layer rows per eta; and how any text goes into markdown (:func:`md_text`, :func:`md_wrap`)
so that run names, overrides, paths and error messages never become markup."""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from calibrate.io.compare.runs import STEERING_FILE, Run, _warn

FRONT_COLUMNS = ("sweep", "job", "label", "overrides", "status", "model", "dataset", "split",
                 "n_examples")
INT_COLUMNS = ("n_examples", "plateau_layer", "peak_ece_layer", "num_layers")


# Inline markdown: characters that start markup wherever they stand (HTML, entities and
# autolinks as entities; the rest backslash-escaped, which CommonMark allows for any ASCII
# punctuation). ``$`` opens math on GitHub.
_ALWAYS = {"\\": "\\\\", "`": "\\`", "*": "\\*", "~": "\\~", "|": "\\|", "$": "\\$",
           "<": "&lt;", ">": "&gt;", "&": "&amp;"}
_LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
# Block markup a line may start with: headings, lists, setext underlines, reference definitions.
_BLOCK_START = re.compile(r"^(#|-|\+|=|\[|\d{1,9}(?=[.)](\s|$)))")


def md_text(text: object) -> str:
    """``text`` as inert markdown inline content (one line): line breaks and control characters
    become spaces, and every character that could open markup is escaped. ``_`` is left alone
    between two letters or digits (``arc_easy``: it cannot open emphasis there) and ``]`` unless
    a link could follow it (``](`` or ``][``), so ordinary names stay readable."""
    plain = _LINE_BREAKS.sub(" ", str(text))
    out = []
    for i, ch in enumerate(plain):
        before, after = plain[i - 1:i], plain[i + 1:i + 2]
        if ch in _ALWAYS:
            out.append(_ALWAYS[ch])
        elif ch == "_" and not (before.isalnum() and after.isalnum()):
            out.append("\\_")
        elif ch == "]" and after in ("(", "["):
            out.append("\\]")
        else:
            out.append(ch)
    return "".join(out)


def md_wrap(escaped: str, width: int = 120) -> str:
    """Inline markdown (already :func:`md_text`) wrapped to ``width`` columns; a line that would
    start block markup (``#``, ``-``, ``+``, ``=``, ``[``, ``1.``) has it escaped."""
    lines = textwrap.wrap(escaped, width - 1, break_long_words=False, break_on_hyphens=False)
    return "\n".join(_BLOCK_START.sub(lambda m: m.group(1) + "\\" if m.group(1)[0].isdigit()
                                      else "\\" + m.group(1), line) for line in lines)


def runs_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The combined table, the identifying columns first and ``path`` last; counts and layers
    stay integers where failed jobs leave them empty."""
    table = pd.DataFrame(list(rows))
    for column in INT_COLUMNS:
        if column in table.columns:
            values = pd.to_numeric(table[column], errors="coerce")
            if values.dropna().eq(values.dropna().round()).all():
                table[column] = values.round().astype("Int64")
    front = [c for c in FRONT_COLUMNS if c in table.columns]
    back = [c for c in ("error", "path") if c in table.columns]
    middle = [c for c in table.columns if c not in front and c not in back]
    return table[front + middle + back]


def _cell(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4f}"
    return md_text(value)


def markdown_table(table: pd.DataFrame) -> str:
    """A pipe table: pandas ``to_markdown`` when ``tabulate`` is installed, else hand-written."""
    try:
        import tabulate  # noqa: F401
    except ImportError:
        header = "| " + " | ".join(_cell(c) for c in table.columns) + " |"
        rule = "| " + " | ".join("---" for _ in table.columns) + " |"
        lines = ["| " + " | ".join(_cell(v) for v in row) + " |"
                 for row in table.itertuples(index=False, name=None)]
        return "\n".join([header, rule, *lines]) + "\n"
    rows = [[_md_value(v) for v in row] for row in table.itertuples(index=False, name=None)]
    cells = pd.DataFrame(rows, columns=[md_text(c) for c in table.columns], dtype=object)
    return cells.to_markdown(index=False, floatfmt=".4f", missingval="") + "\n"


def _md_value(value: Any) -> Any:
    """A cell for tabulate: missing -> None (blank), text with its pipes escaped."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return md_text(value)
    return value.item() if isinstance(value, np.generic) else value


def _run_info(run: Run) -> dict[str, Any]:
    return {"sweep": run.sweep, "job": run.job_dir.name, "label": run.label,
            "overrides": " ".join(run.overrides), "model": run.row.get("model"),
            "dataset": run.row.get("dataset"), "direction_method": run.row.get("direction_method"),
            "direction_layers": run.row.get("direction_layers")}


def final_steering_rows(run: Run) -> pd.DataFrame | None:
    """The job's final-layer steering rows (one per eta), from steering.csv or metrics.json
    (computed once per run; a copy is returned)."""
    if not run.complete:
        return None
    if "final steering" not in run._tables:
        run._tables["final steering"] = _final_steering_rows(run)
    found = run._tables["final steering"]
    return None if found is None else found.copy()


def _final_steering_rows(run: Run) -> pd.DataFrame | None:
    table = None
    if (run.job_dir / STEERING_FILE).is_file():
        full = run.table(STEERING_FILE)
        if full is not None and {"layer", "eta"} <= set(full.columns):
            table = full[full["layer"] == full["layer"].max()].copy()
        else:
            _warn(f"{run.job_dir / STEERING_FILE}: cannot read the steering table; using "
                  "metrics.json")
    if table is None and isinstance(run.metrics.get("steering"), Mapping):
        rows = [{"eta": float(eta), **values} for eta, values in run.metrics["steering"].items()]
        table = pd.DataFrame(rows)
        if run.metrics.get("num_layers"):
            table.insert(1, "layer", int(run.metrics["num_layers"]) - 1)
    if table is None or table.empty:
        return None
    info = _run_info(run)
    for k, (key, value) in enumerate(info.items()):
        table.insert(k, key, value)
    return table.sort_values("eta").reset_index(drop=True)
