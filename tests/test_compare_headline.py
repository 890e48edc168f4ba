"""calibrate.io.compare.headline: a headline of at most ten columns, detail tables keyed by
#, markdown that never passes 120 characters a line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from calibrate.io.compare import detail_tables, fit_markdown, headline_table, load_runs
from calibrate.io.report.synthetic import write_sweep


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return load_runs([write_sweep(tmp_path_factory.mktemp("s") / "sweep", 8, failed=1)])


def test_headline_one_row_per_complete_run(runs):
    table = headline_table(runs)
    assert len(table.columns) <= 10 and list(table["#"]) == list(range(1, 9))
    first = runs[0].metrics
    assert table.loc[0, "acc"] == pytest.approx(first["final"]["accuracy"])
    assert table.loc[0, "ECE"] == pytest.approx(first["final"]["ece"])
    best = min((v["delta_ece"], float(e)) for e, v in first["steering"].items() if float(e))
    assert table.loc[0, "best ΔECE (η)"].startswith(f"{best[0]:+.3f}*")
    assert f"(η={best[1]:g})" in table.loc[0, "best ΔECE (η)"]
    assert not table["run"].str.contains("model=|dataset=|tracker=").any()  # own columns


def test_details_are_keyed_by_the_run_number(runs):
    tables = detail_tables(runs)
    assert list(tables)[:2] == ["Final layer", "Phases"] and "Failed runs" in tables
    assert tables["Failed runs"]["#"].tolist() == [9]
    steering = tables["Steering: final layer per η (* flagged after the multiple-comparisons "
                      "correction)"]
    assert len(steering) == 8 * 4 and "0" not in set(steering["η"])  # η = 0 is the reference
    assert steering["ΔECE interval"].str.endswith("*").any()


def test_fit_markdown_cuts_text_then_splits_columns():
    wide = pd.DataFrame({"#": [1, 2], "text": ["x" * 300, "short"],
                         **{f"metric_{i}": np.arange(2) / 3 for i in range(14)}})
    text = fit_markdown(wide, 120)
    lines = text.splitlines()
    assert all(len(line) <= 120 for line in lines)
    assert "…" in text
    headers = [line for line in lines if line.startswith("| #")]
    assert len(headers) == 2  # a continuation table, keyed by # again
    assert all(f"metric_{i}" in text for i in range(14))
