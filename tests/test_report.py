"""``calibrate report`` (``python -m calibrate report``): one self-contained HTML page and the same tables as markdown
from synthetic sweeps; bad input exits 2 with one line and writes nothing."""

from __future__ import annotations

import base64
import re
import subprocess
import sys

import pytest
from cli_support import cli_env
from references import (
    HOSTILE,
    HOSTILE_ERROR,
    HOSTILE_MODEL,
    assert_no_markup_from,
    assert_shown_as_given,
    hostile_sweep,
    md_to_html,
    parse_html,
)

from calibrate.io import report
from calibrate.io.compare import ACCEPTED
from calibrate.io.report.synthetic import write_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    sweep = write_sweep(tmp_path_factory.mktemp("sweep") / "multirun", 8, failed=1)
    assert report.main([str(sweep), "--metric", "ece", "--dpi", "30"]) == 0
    return sweep / "report"


def test_default_out_holds_page_markdown_and_figures(built):
    names = {p.name for p in built.iterdir()}
    assert {"report.html", "report.md", "layers_ece.png", "eta_ece.png", "ablation_ece.png",
            "nullspace_truncation.png", "steering.csv", "nullspace.csv"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert (built / "eta_ece.png").read_bytes()[:8] == PNG_MAGIC


def test_html_is_self_contained(built):
    page = (built / "report.html").read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing fetched
    assert "<link" not in page and "@import" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4  # layers, eta, ablation, null space
    assert all(base64.b64decode(i)[:8] == PNG_MAGIC for i in images)
    assert page.count('<table class="sortable">') >= 6 and "addEventListener" in page
    headline = page.split("<h3>Headline</h3>")[1].split("</table>")[0]
    assert headline.count("<tr>") == 1 + 8  # header and the complete runs


def test_markdown_headline_fits_a_screen(built):
    text = (built / "report.md").read_text()
    assert all(len(line) <= 120 for line in text.splitlines())
    head = text.split("## Headline")[1].split("## ")[0]
    table = [line for line in head.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 8
    assert table[0].count("|") - 1 <= 10
    for name in ("layers_ece.png", "eta_ece.png"):
        assert f"![{name}]({name})" in text
    assert "## Failed runs" in text and "DirectionError" in text


def test_out_option_and_several_sweeps(tmp_path):
    first = write_sweep(tmp_path / "a", 1)
    second = write_sweep(tmp_path / "b", 1, seed=1)
    out = tmp_path / "out"
    written = report.build_report([first, second], out, metrics=["accuracy"], dpi=30)
    assert {p.name for p in written} >= {"report.html", "report.md", "layers_accuracy.png"}
    assert not (first / "report").exists()
    md = (out / "report.md").read_text()
    assert "2 runs (2 complete)" in md


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, kind):
    good = write_sweep(tmp_path / "good", 1)
    bad = tmp_path / "bad"
    if kind == "empty":
        bad.mkdir()
    elif kind == "file":
        bad.write_text("x")
    out = tmp_path / "out"
    assert report.main([str(good), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "accepted" in err[0]
    assert not out.exists() and not (good / "report").exists()


def test_command_line(tmp_path):
    bad = tmp_path / "nothing"
    bad.mkdir()
    proc = subprocess.run([sys.executable, "-m", "calibrate", "report", str(bad)],
                          capture_output=True, text=True, cwd=tmp_path, env=cli_env())
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {bad}: neither a sweep nor a job directory (no job folders with .hydra/, no "
        f"metrics.json); accepted: {ACCEPTED}")
    assert not (bad / "report").exists()


# ---------------------------------------------------------------- user text is never markup

def test_user_text_is_never_markup_in_markdown_or_html(tmp_path):
    """Hostile run name, model name, error message and folder name: report.md renders them as
    text (no HTML, link, code, emphasis or heading; every table row keeps its columns) and
    report.html escapes them; the figures draw them (no mathtext)."""
    sweep = hostile_sweep(tmp_path)
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out), "--metric", "ece", "--dpi", "30"]) == 0
    md = (out / "report.md").read_text()
    assert all(len(line) <= 120 for line in md.splitlines())
    for block in re.split(r"\n\s*\n", md):  # every pipe table keeps its columns on every row
        rows = [line for line in block.splitlines() if line.startswith("|")]
        pipes = {len(re.findall(r"(?<!\\)\|", line)) for line in rows}
        assert len(pipes) <= 1, block
    rendered = parse_html(md_to_html(md))
    figures = len(re.findall(r"^!\[", md, re.MULTILINE))
    assert figures >= 1  # layers_ece.png, eta_ece.png
    assert_no_markup_from(rendered, h1=1, img=figures)  # the title and the figure links
    for given in (HOSTILE, HOSTILE_MODEL, HOSTILE_ERROR):
        assert_shown_as_given(rendered.cells, given)
    intro = parse_html(md_to_html(md.split("\n## ")[0]))
    assert str(sweep) in intro.text.replace("\n", " ")

    page = parse_html((out / "report.html").read_text())
    assert_no_markup_from(page, h1=1, img=figures, script=1)  # the sort script
    for given in (HOSTILE, HOSTILE_MODEL, HOSTILE_ERROR):
        assert any(given in cell for cell in page.cells), given
