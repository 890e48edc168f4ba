"""Compare finished runs: one table of all jobs, overlaid layer curves, steering and ablations.

``calibrate compare DIR [DIR ...] [--out OUTDIR] [--metric ece ...] [--relative-depth]``

Each DIR is a sweep directory (a multirun folder whose job sub-folders hold ``.hydra/``) or a
single job directory (``.hydra/``, ``metrics.json`` or ``error.json`` in it). Anything else
ends in one line on stderr naming the path and what is accepted, exit status 2, and nothing
written. Everything runs offline; ``--wandb-group ENTITY/PROJECT/GROUP`` adds the summaries of
an online W&B group to the table and fails with a clear message when W&B cannot be reached.

Outputs in ``--out`` (default ``./compare``), each written atomically:

* ``runs.csv``: one row per job (sweep, job, label, overrides, status, model, dataset,
  n_examples, final-layer metrics, plateau/peak layers, steering settings, path); ``runs.md``:
  a headline table (at most ten columns, 120 characters a line), then detail tables;
* ``layers_<metric>.png``: per-layer curves, one panel per model × dataset, bootstrap bands and
  the temperature-scaling baseline;
* with steering jobs: ``steering.csv`` (each job's final-layer row per eta, with its overrides)
  and ``eta_<metric>.png`` (final-layer Δmetric against eta, one panel per model × dataset × η
  unit, paired intervals, the random-direction null band and the temperature baseline);
* when steering jobs differ in ``direction.layers``: ``ablation_<metric>.png``, heat maps of the
  final-layer Δmetric, layer range × eta, ``*`` where the paired interval excludes 0;
* with ``nullspace.json`` files: ``nullspace.csv`` and ``nullspace_truncation.png`` (truncation
  ΔECE/ΔMCE next to the random-subspace control).

The figures follow :mod:`calibrate.io.plotstyle`; panels and colours come from
:mod:`~calibrate.io.compare.facets`. ``calibrate report`` builds a self-contained
HTML page on the same runs (:mod:`calibrate.io.report`).

Runs are labelled by the overrides that differ between them (``.hydra/overrides.yaml``), or by
model/dataset when nothing differs; a label that still repeats gets its sweep and job appended.

Modules: :mod:`~calibrate.io.compare.runs` (the inputs, each job read, the labels),
:mod:`~calibrate.io.compare.tables` (runs table, markdown, steering rows),
:mod:`~calibrate.io.compare.nullspace_json` (the null-space controls),
:mod:`~calibrate.io.compare.wandb_group` (an online W&B group),
:mod:`~calibrate.io.compare.figures` (the plots), :mod:`~calibrate.io.compare.headline` (the
headline and detail tables) and :mod:`~calibrate.io.compare.compare_cli`
(:func:`compare` and the command line ``main``). Their names are re-exported here.
"""

from __future__ import annotations

from calibrate.io.compare.compare_cli import (
                                      DEFAULT_METRICS,
                                      DEFAULT_OUT,
                                      PROGRESS_MIN_JOBS,
                                      _read_all,  # noqa: F401 - _read_all: tests
                                      compare,
                                      comparison_tables,
                                      load_runs,
                                      main,
                                      tables_markdown,
)
from calibrate.io.compare.figures import comparison_figures, layer_lines
from calibrate.io.compare.headline import detail_tables, fit_markdown, headline_table
from calibrate.io.compare.nullspace_json import nullspace_fields, nullspace_rows
from calibrate.io.compare.runs import (
                                      ACCEPTED,
                                      IDENTITY_KEYS,
                                      NULLSPACE_FILE,
                                      STEERING_FILE,
                                      CompareError,
                                      Run,
                                      assign_labels,
                                      layer_range,
                                      read_overrides,
                                      read_run,
                                      resolve_inputs,
)
from calibrate.io.compare.tables import (
                                      FRONT_COLUMNS,
                                      INT_COLUMNS,
                                      final_steering_rows,
                                      markdown_table,
                                      runs_table,
)
from calibrate.io.compare.wandb_group import wandb_rows

__all__ = [
    "ACCEPTED", "DEFAULT_METRICS", "DEFAULT_OUT", "FRONT_COLUMNS", "IDENTITY_KEYS", "INT_COLUMNS",
    "NULLSPACE_FILE", "PROGRESS_MIN_JOBS", "STEERING_FILE", "CompareError", "Run",
    "assign_labels", "compare", "comparison_figures", "comparison_tables", "detail_tables",
    "final_steering_rows", "fit_markdown", "headline_table", "layer_lines", "layer_range",
    "load_runs", "main", "markdown_table", "nullspace_fields", "nullspace_rows", "read_overrides",
    "read_run", "resolve_inputs", "runs_table", "tables_markdown", "wandb_rows",
]
