"""A self-contained HTML page: figures inline as base64 PNG, tables sortable by a few lines of
inline JavaScript (click a header), no external resource of any kind (no CDN, no font, no
stylesheet link), so the file opens offline and can be mailed as it is."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h3 { font-size: 1em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 12px; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; cursor: pointer; user-select: none; white-space: nowrap; }
th[data-dir=asc]::after { content: " \\25B2"; } th[data-dir=desc]::after { content: " \\25BC"; }
tr:nth-child(even) td { background: #fafafa; }
.wrap { overflow-x: auto; } figure { margin: 1em 0; } img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 12px; }
"""

SORT_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], col = th.cellIndex;
    var asc = th.dataset.dir !== "asc";
    th.closest("tr").querySelectorAll("th").forEach(function (h) { delete h.dataset.dir; });
    th.dataset.dir = asc ? "asc" : "desc";
    var key = function (row) {
      var cell = row.cells[col];
      return cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent;
    };
    Array.from(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y, undefined, {numeric: true});
      return asc ? c : -c;
    }).forEach(function (row) { body.appendChild(row); });
  });
});
"""


def _cell(value: object) -> str:
    """One ``<td>``: numbers right-aligned with their exact value as the sort key."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "<td></td>"
    if isinstance(value, (bool, np.bool_)):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, (int, np.integer)):
        return f'<td class="n">{int(value)}</td>'
    if isinstance(value, (float, np.floating)):
        return f'<td class="n" data-v="{float(value)!r}">{float(value):.4f}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def html_table(table: pd.DataFrame) -> str:
    """``table`` as a sortable HTML table (every value escaped)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = "\n".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>"
                     for row in table.itertuples(index=False, name=None))
    return (f'<div class="wrap"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>\n{rows}\n</tbody></table></div>")


def html_figure(name: str, png: bytes, caption: str = "") -> str:
    """An inline PNG (base64 data URI) with its file name as caption."""
    data = base64.b64encode(png).decode("ascii")
    text = html.escape(caption or name)
    return (f'<figure id="{html.escape(name)}"><img alt="{html.escape(name)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{text}</figcaption></figure>')


@dataclass(frozen=True)
class Section:
    """One part of the page: its figures first, then its tables (each with its own title)."""

    title: str
    figures: Mapping[str, bytes] = field(default_factory=dict)
    tables: Mapping[str, pd.DataFrame] = field(default_factory=dict)


def render_page(title: str, intro: Sequence[str], sections: Sequence[Section]) -> str:
    """The whole page: title, intro lines, then each non-empty section (an ``<h2>``, its
    figures, then its tables under ``<h3>`` titles)."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(line)}</p>" for line in intro]
    for section in sections:
        if not section.figures and not section.tables:
            continue
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [html_figure(name, png) for name, png in section.figures.items()]
        for heading, table in section.tables.items():
            parts.append(f"<h3>{html.escape(heading)}</h3>\n{html_table(table)}")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
            f"<body>\n{body}\n<script>{SORT_JS}</script>\n</body></html>\n")
