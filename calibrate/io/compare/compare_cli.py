"""The comparison itself and its command line (``calibrate compare``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from calibrate.io import results
from calibrate.io.compare.figures import comparison_figures, save_all
from calibrate.io.compare.headline import detail_tables, headline_table, markdown_sections
from calibrate.io.compare.nullspace_json import nullspace_rows
from calibrate.io.compare.runs import (
    STEERING_FILE,
    CompareError,
    Run,
    _warn,
    assign_labels,
    read_run,
    resolve_inputs,
)
from calibrate.io.compare.seeds import seed_rows
from calibrate.io.compare.tables import final_steering_rows, md_text, md_wrap, runs_table
from calibrate.io.compare.wandb_group import wandb_rows

DEFAULT_OUT = "compare"
DEFAULT_METRICS = ("accuracy", "ece", "mce")
PROGRESS_MIN_JOBS = 10  # a progress bar from this many jobs on


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out}: exists and is not a directory")


def _read_all(jobs: Sequence[tuple[str, Path]]) -> list[Run]:
    from tqdm.auto import tqdm

    return [read_run(sweep, job) for sweep, job in
            tqdm(jobs, desc="reading jobs", unit="job", disable=len(jobs) < PROGRESS_MIN_JOBS)]


def load_runs(dirs: Sequence[str | Path]) -> list[Run]:
    """Every job under ``dirs``, read and labelled; CompareError on a path that is neither a
    sweep nor a job directory."""
    runs = _read_all(resolve_inputs(dirs))
    assign_labels(runs)
    return runs


def comparison_tables(runs: Sequence[Run]) -> dict[str, pd.DataFrame]:
    """The CSV tables beside the figures: ``steering.csv`` (each steering job's final-layer rows
    per η), ``seeds.csv`` (steering results aggregated over runs that differ only in their
    seed) and ``nullspace.csv`` (the null-space controls), when the runs have them."""
    tables = {}
    steered = [t for r in runs if (t := final_steering_rows(r)) is not None]
    if steered:
        tables[STEERING_FILE] = pd.concat(steered, ignore_index=True)
    seeds = seed_rows(runs)
    if len(seeds):
        tables["seeds.csv"] = seeds
    rows = [row for r in runs for row in nullspace_rows(r)]
    if rows:
        tables["nullspace.csv"] = pd.DataFrame(rows)
        if not any(k.startswith("delta_") for k in tables["nullspace.csv"].columns):
            _warn("nullspace.json files hold no truncation deltas; nullspace.csv only")
    return tables


def tables_markdown(runs: Sequence[Run], heading: str) -> str:
    """The headline table, then the detail tables, as markdown of at most 120 columns.
    ``heading``: markdown whose lines that are not ``#`` headings are wrapped (user text in it
    already :func:`~calibrate.io.compare.tables.md_text`)."""
    heading = "\n".join(md_wrap(part) if not part.startswith("#") else part
                        for part in heading.split("\n"))
    return (f"{heading}\n\n" + markdown_sections({"Headline": headline_table(runs)})
            + "\n" + markdown_sections(detail_tables(runs)))


def compare(
    dirs: Sequence[str | Path],
    out: str | Path = DEFAULT_OUT,
    metrics: Sequence[str] = DEFAULT_METRICS,
    relative_depth: bool = False,
    wandb_group: str | None = None,
) -> pd.DataFrame:
    """Compare the jobs under ``dirs`` and write the tables and plots to ``out``.

    Args:
        dirs: sweep directories and/or single job directories.
        out: output folder (created).
        metrics: per-layer metrics to draw (and, for steering jobs, against eta).
        relative_depth: x axis layer / last layer, for models of different depth.
        wandb_group: ``ENTITY/PROJECT/GROUP`` of an online W&B group to add to the table.

    Returns:
        The runs table (as in ``runs.csv``); ``.attrs["outputs"]`` lists the written files.

    Raises:
        CompareError: a path is neither a sweep nor a job directory, ``out`` is a file, or the
            W&B group cannot be fetched. Nothing is written then.
    """
    out = Path(out)
    metrics = list(dict.fromkeys(metrics)) or list(DEFAULT_METRICS)
    resolve_inputs(dirs)
    _check_out(out)
    extra_rows = wandb_rows(wandb_group) if wandb_group else []
    runs = load_runs(dirs)
    table = runs_table([r.row for r in runs] + extra_rows)
    tables = comparison_tables(runs)
    figures = comparison_figures(runs, metrics, relative_depth, tables.get("nullspace.csv"))
    out.mkdir(parents=True, exist_ok=True)
    written = [results.write_csv(out / "runs.csv", table)]
    n_done = int((table["status"] == "complete").sum()) if len(table) else 0
    heading = "# calibrate comparison\n\n" + md_text(
        f"{len(table)} runs ({n_done} complete) from {', '.join(str(d) for d in dirs)}"
        f"{' and W&B group ' + wandb_group if wandb_group else ''}.")
    written.append(results.write_text(out / "runs.md", tables_markdown(runs, heading)))
    written += [results.write_csv(out / name, t) for name, t in tables.items()]
    written += save_all(figures, out)
    table.attrs["outputs"] = [str(p) for p in written]
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(
        prog="calibrate compare",
        description="Compare calibrate runs: one table of all jobs, overlaid per-layer curves, "
                    "steering curves, layer-range ablations and null-space controls.")
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="sweep directory (multirun) or single job directory")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: ./compare)")
    parser.add_argument("--metric", nargs="+", action="extend", dest="metrics", default=None,
                        metavar="METRIC",
                        help="per-layer metrics to plot (default: accuracy ece mce)")
    parser.add_argument("--relative-depth", action="store_true",
                        help="x axis layer / last layer, for models of different depth")
    parser.add_argument("--wandb-group", default=None, metavar="ENTITY/PROJECT/GROUP",
                        help="also add the summaries of an online W&B group (needs network)")
    args = parser.parse_args(argv)
    try:
        table = compare(args.dirs, args.out, args.metrics or DEFAULT_METRICS, args.relative_depth,
                        args.wandb_group)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    outputs = table.attrs.get("outputs", [])
    n_done = int((table["status"] == "complete").sum()) if len(table) else 0
    print(f"[calibrate] compared {len(table)} runs ({n_done} complete); outputs in "
          f"{Path(args.out).resolve()}:")
    for path in outputs:
        print(f"  {path}")
    return 0
