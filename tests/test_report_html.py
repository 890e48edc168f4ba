"""calibrate.io.report.html: escaped, sortable tables and inline figures, nothing external."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd

from calibrate.io.report.html import Section, html_figure, html_table, render_page


def test_table_escapes_and_keeps_exact_sort_keys():
    table = pd.DataFrame({"run": ["<b>x</b> & y", None], "ece": [0.123456789, np.nan],
                          "n": [3, 4], "sig": [True, False]})
    text = html_table(table)
    assert "&lt;b&gt;x&lt;/b&gt; &amp; y" in text and "<b>" not in text
    assert 'data-v="0.123456789"' in text and ">0.1235<" in text
    assert '<td class="n">3</td>' in text and "<td>yes</td>" in text
    assert text.count("<tr>") == 3 and 'class="sortable"' in text


def test_figure_is_a_data_uri():
    png = b"\x89PNG\r\n\x1a\nrest"
    text = html_figure("eta_ece.png", png)
    data = text.split("base64,")[1].split('"')[0]
    assert base64.b64decode(data) == png and "<figcaption>eta_ece.png</figcaption>" in text


def test_page_has_its_script_and_no_external_resource():
    page = render_page("t <1>", ["intro"], [
        Section("Steering", {"eta_ece.png": b"png"}, {"A": pd.DataFrame({"x": [1]})}),
        Section("Empty"), Section("Jobs", {}, {"B": pd.DataFrame({"y": [2]})})])
    assert page.startswith("<!DOCTYPE html>") and "<title>t &lt;1&gt;</title>" in page
    assert "<script>" in page and "http" not in page and "<link" not in page
    # each section: its figures first, then its tables; an empty section is left out
    assert page.index("<h2>Steering</h2>") < page.index('id="eta_ece.png"') \
        < page.index("<h3>A</h3>") < page.index("<h2>Jobs</h2>") < page.index("<h3>B</h3>")
    assert "Empty" not in page
