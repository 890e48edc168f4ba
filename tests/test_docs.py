"""The READMEs describe the tree as it is: every path, module and command they name exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from calibrate.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "experiments" / "README.md"]
PATH = re.compile(r"`((?:calibrate|tests|experiments|\.ci)/[A-Za-z0-9_./<>*-]*)`")
MODULE = re.compile(r"python -m (calibrate(?:\.[a-z_]+)*)")
COMMAND = re.compile(r"`calibrate ([a-z]+)\b")


def _named(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    return sorted({(doc.name, m) for doc in DOCS for m in pattern.findall(doc.read_text())})


@pytest.mark.parametrize("doc, path", _named(PATH))
def test_every_path_named_exists(doc, path):
    if "<" in path or "*" in path:  # a pattern: its fixed folder must exist
        path = path.split("<")[0].split("*")[0].rsplit("/", 1)[0]
    assert (REPO / path.rstrip("/")).exists(), f"{doc} names {path}"


@pytest.mark.parametrize("doc, module", _named(MODULE))
def test_every_module_run_with_python_m_exists(doc, module):
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{doc} runs python -m {module}"
    if spec.submodule_search_locations:  # a package runs its __main__
        assert importlib.util.find_spec(f"{module}.__main__") is not None


@pytest.mark.parametrize("doc, command", _named(COMMAND))
def test_every_calibrate_command_named_exists(doc, command):
    assert command in COMMANDS, f"{doc} names `calibrate {command}`"


def test_the_checks_find_what_they_look_for():
    assert ("README.md", "calibrate/config/compose.py") in _named(PATH)
    assert ("README.md", "calibrate.run") in _named(MODULE)
    assert ("README.md", "report") in _named(COMMAND)
