"""One report for one or more sweeps: ``calibrate report DIR [DIR ...] [--out OUT]``.

Built on the comparison's run loading and figures (:mod:`calibrate.io.compare`). Writes into
``--out`` (default ``<first DIR>/report``), each file atomically:

* ``report.html``: one self-contained page (figures inline as base64 PNG, sortable tables by a
  few lines of inline JavaScript, nothing fetched from the network);
* ``report.md``: the same tables as markdown (a headline of at most ten columns and 120
  characters per line, then the detail tables) with links to the figures;
* the figure PNGs and the CSV tables (``steering.csv``, ``nullspace.csv``) beside them.

Bad input (a path that is neither a sweep nor a job directory) ends in one line on stderr
naming it and what is accepted, exit status 2, and nothing written.

Modules: :mod:`~calibrate.io.report.html` (the page), :mod:`~calibrate.io.report.report_cli`
(:func:`build_report`, ``main``) and :mod:`~calibrate.io.report.synthetic` (synthetic sweeps
for tests and a try-out).
"""

from __future__ import annotations

from calibrate.io.report.report_cli import build_report, default_out, main

__all__ = ["build_report", "default_out", "main"]
