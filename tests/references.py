"""Reference implementations the tests compare the harness against (test-only code).

* ``loglik_reference``: the model's own log-likelihood of each cloze continuation, lm-eval's
  score, computed the slow, obvious way (was ``calibrate.engine.cloze.loglik_reference``).
* ``md_to_html`` and ``parse_html``: what a markdown file or an HTML page shows, decided by an
  independent renderer (markdown-it) and the standard library's HTML parser; ``hostile_sweep``:
  a synthetic sweep whose user-given text is hostile markup.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from calibrate.model.load import LoadedModel
from calibrate.tasks.continuations import ClozeRequest


def loglik_reference(loaded: LoadedModel, request: ClozeRequest) -> np.ndarray:
    """[K] the model's own summed log-probabilities of each continuation (lm-eval's score).

    Each context + continuation runs alone, from scratch, through the full model (``model(...)``,
    its own final norm and head); log-softmax over the vocabulary, gathered at the continuation.
    """
    n = len(request.context_ids)
    out = []
    with torch.inference_mode():
        for cont in request.continuations:
            ids = torch.tensor([request.context_ids + cont], device=loaded.device)
            logits = loaded.model(input_ids=ids).logits[0, n - 1:-1].double()
            target = torch.tensor(cont, device=logits.device)[:, None]
            out.append(float(torch.log_softmax(logits, -1).gather(1, target).sum()))
    return np.array(out)


# ---------------------------------------------------------------- markup in user text

HOSTILE = ("+note=<script>alert(1)</script> | [x](javascript:alert(1)) `code` **bold** _em_ "
           "$\\frac$ ~~s~~ &amp; a\\|b\n# heading")
HOSTILE_MODEL = "m<img src=x onerror=alert(1)>|$\\bad$"
HOSTILE_ERROR = "bad `x` <b>|</b>\n[y](javascript:z) *e*"
MARKUP = ("script", "img", "a", "i", "b", "code", "strong", "em", "del", "s", "h1")


def hostile_sweep(root: Path) -> Path:
    """A synthetic sweep (2 complete jobs, 1 failed) whose run name (an override, first so that
    no cut hides it), model name and error message are hostile, in a folder whose name is
    hostile too (all a file name can hold)."""
    from calibrate.io.report.synthetic import write_sweep

    sweep = write_sweep(root / "s <i>|[a](javascript:b)`c`", 2, failed=1, nullspace=False)
    overrides = sweep / "0" / ".hydra" / "overrides.yaml"
    overrides.write_text(OmegaConf.to_yaml([HOSTILE, *OmegaConf.load(overrides)]))
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    (sweep / "0" / "metrics.json").write_text(json.dumps({**metrics, "model": HOSTILE_MODEL}))
    (sweep / "2" / "error.json").write_text(json.dumps({"error_type": "DirectionError",
                                                         "error": HOSTILE_ERROR}))
    return sweep


def md_to_html(text: str) -> str:
    """``text`` rendered by markdown-it (CommonMark with raw HTML on, GFM tables): an
    independent renderer decides what is markup."""
    markdown_it = pytest.importorskip("markdown_it")
    return markdown_it.MarkdownIt("commonmark", {"html": True}).enable("table").render(text)


class Page(HTMLParser):
    """The tags of an HTML page, its text and the text of every table cell (entities
    decoded)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.cells: list[str] = []
        self.text = ""
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.text += data
        if self._cell is not None:
            self._cell.append(data)


def parse_html(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


def assert_no_markup_from(page: Page, **allowed: int) -> None:
    """No tag of :data:`MARKUP` beyond the page's own (``allowed``: tag -> count) and no
    ``javascript:`` in any attribute."""
    names = [tag for tag, _ in page.tags]
    assert {t: names.count(t) for t in MARKUP if names.count(t)} == allowed
    assert not any(v and "javascript" in v for _, attrs in page.tags for v in attrs.values())


def assert_shown_as_given(cells: list[str], given: str) -> None:
    """Some cell shows ``given`` (line breaks as spaces), whole, or cut with a trailing … after
    at least 8 of its characters."""
    flat = given.replace("\n", " ")
    shown = [c for c in map(str.strip, cells) if flat in c or (
        c.endswith("…") and len(c) > 8 and flat.startswith(c[:-1]))]
    assert shown, (given, cells)
