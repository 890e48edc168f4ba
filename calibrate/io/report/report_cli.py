"""``calibrate report DIR [DIR ...] [--out OUT]``: build the report and its command
line."""

from __future__ import annotations

import argparse
import io
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from calibrate.io import results
from calibrate.io.compare.compare_cli import (
    DEFAULT_METRICS,
    _check_out,
    comparison_tables,
    load_runs,
)
from calibrate.io.compare.figures import comparison_figures
from calibrate.io.compare.headline import detail_tables, headline_table, markdown_sections
from calibrate.io.compare.runs import CompareError, resolve_inputs
from calibrate.io.compare.tables import md_text, md_wrap
from calibrate.io.report.html import Section, render_page

REPORT_DIR = "report"
DPI = 100


def default_out(dirs: Sequence[str | Path]) -> Path:
    """``<first dir>/report``."""
    return Path(dirs[0]) / REPORT_DIR


def png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure rendered as PNG."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# The report's parts in order: (title, figure name prefixes, detail table title prefixes).
SECTIONS = (
    ("Runs at a glance", (), ("Headline",)),
    ("Every layer (probe, and each study's unsteered evaluation split)", ("layers_",),
     ("Final layer", "Phases")),
    ("Steering", ("eta_",), ("Steering", "Across seeds")),
    ("Ablations and the null space", ("ablation_", "nullspace_"), ("Null-space",)),
    ("Jobs", (), ("Runs", "Failed runs")),
)


def report_sections(tables: dict[str, object], pngs: dict[str, bytes]) -> list[Section]:
    """The tables and figures grouped by study, figures first (:data:`SECTIONS`); anything
    matching no section goes last, so nothing is dropped."""
    sections, used_t, used_f = [], set(), set()
    for title, fig_prefixes, table_prefixes in SECTIONS:
        figs = {n: p for n, p in pngs.items() if n.startswith(fig_prefixes) and n not in used_f}
        tabs = {t: v for t, v in tables.items() if t.startswith(table_prefixes) and t not in used_t}
        used_f |= set(figs)
        used_t |= set(tabs)
        sections.append(Section(title, figs, tabs))
    sections.append(Section("Other", {n: p for n, p in pngs.items() if n not in used_f},
                            {t: v for t, v in tables.items() if t not in used_t}))
    return sections


def build_report(dirs: Sequence[str | Path], out: str | Path | None = None,
                 metrics: Sequence[str] = DEFAULT_METRICS, relative_depth: bool = False,
                 dpi: int = DPI) -> list[Path]:
    """Read the runs under ``dirs`` and write ``report.html``, ``report.md``, the figure PNGs
    and the CSV tables into ``out`` (default ``<first dir>/report``); returns the written paths.

    Raises:
        CompareError: a path is neither a sweep nor a job directory, or ``out`` is a file.
            Nothing is written then.
    """
    resolve_inputs(dirs)
    out = Path(out) if out is not None else default_out(dirs)
    _check_out(out)
    runs = load_runs(dirs)
    csvs = comparison_tables(runs)
    figures = comparison_figures(runs, list(dict.fromkeys(metrics)) or list(DEFAULT_METRICS),
                                 relative_depth, csvs.get("nullspace.csv"))
    pngs = {name: png_bytes(fig, dpi) for name, fig in figures.items()}
    tables = {"Headline": headline_table(runs), **detail_tables(runs)}
    sections = report_sections(tables, pngs)
    done = sum(r.complete for r in runs)
    intro = [f"{len(runs)} runs ({done} complete) from {', '.join(str(d) for d in dirs)}; "
             "every table is keyed by the run number #."]
    written = [results.atomic_write(out / name, lambda h, b=png: h.write(b))
               for name, png in pngs.items()]
    written += [results.write_csv(out / name, table) for name, table in csvs.items()]
    lines = [md_wrap(md_text(line)) for line in intro]  # paths are user text: never markup
    md = "# calibrate report\n\n" + "\n\n".join(lines) + "\n\n"
    for section in sections:
        if section.figures or section.tables:
            md += f"## {md_text(section.title)}\n\n"
            md += "".join(f"![{md_text(n)}]({quote(n)})\n\n" for n in section.figures)
            tables_md = markdown_sections(section.tables)
            md += re.sub(r"^## ", "### ", tables_md, flags=re.MULTILINE) + "\n"
    written.append(results.write_text(out / "report.md", md))
    written.append(results.write_text(out / "report.html",
                                      render_page("calibrate report",
                                                  [*intro, "Click a column header to sort."],
                                                  sections)))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(
        prog="calibrate report",
        description="One self-contained HTML page (and the same tables as markdown) for one or "
                    "more sweeps: a headline table, detail tables and the comparison figures.")
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="sweep directory (multirun) or single job directory")
    parser.add_argument("--out", default=None,
                        help=f"output folder (default: <first DIR>/{REPORT_DIR})")
    parser.add_argument("--metric", nargs="+", action="extend", dest="metrics", default=None,
                        metavar="METRIC", help="metrics to draw (default: accuracy ece mce)")
    parser.add_argument("--relative-depth", action="store_true",
                        help="x axis layer / last layer in the per-layer figures")
    parser.add_argument("--dpi", type=int, default=DPI, help=f"figure resolution (default {DPI})")
    args = parser.parse_args(argv)
    try:
        written = build_report(args.dirs, args.out, args.metrics or DEFAULT_METRICS,
                               args.relative_depth, args.dpi)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    page = next(p for p in written if p.name == "report.html")
    print(f"[calibrate] report: {page.resolve()} ({len(written)} files in {page.parent})")
    return 0
