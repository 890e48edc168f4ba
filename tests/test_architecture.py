"""The package's shape: layers import only downwards, module names are unique, configs are read
in one place and no function below the entry points takes a raw mapping.

The layers, lowest first (README, "Architecture"): a package may import its own modules and any
package of a lower layer, never one above; the entry points may import each other.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "calibrate"
LAYERS = (
    ("errors",), ("values", "plugins"), ("core",), ("io",), ("model",), ("tasks",), ("engine",),
    ("readouts",), ("directions",), ("config",), ("studies",),
    ("job", "preflight", "run", "api", "cli", "bench", "__init__", "__main__"),
)
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
ENTRY = set(LAYERS[-1])


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _unit(module: str) -> str:
    """The package (or top-level module) a module belongs to."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _imports(module: str, text: str | None = None) -> set[str]:
    """calibrate modules ``module`` imports (``from calibrate import x`` counts as ``x``)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text() if text is None else text)):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "calibrate":
            subs = [f"{node.module}.{a.name}" for a in node.names]
            targets = [s for s in subs if s in MODULES] or [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "calibrate"]
        found.update(t for t in targets if t in MODULES and t != module)
    return found


def _edges(texts: dict[str, str] | None = None) -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module in MODULES:
        for target in _imports(module, (texts or {}).get(module)):
            a, b = _unit(module), _unit(target)
            if a != b:
                edges[(a, b)].append(f"{module} -> {target}")
    return edges


def test_every_package_has_a_layer():
    units = {_unit(m) for m in MODULES}
    assert units <= set(RANK), sorted(units - set(RANK))


def _upward(edges: dict[tuple[str, str], list[str]]) -> list[str]:
    return [line for (a, b), lines in edges.items()
            if not (a in ENTRY and b in ENTRY) and RANK[b] > RANK[a] for line in lines]


def test_nothing_imports_upward():
    assert _upward(_edges()) == []


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in _edges():
        graph[a].add(b)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n}))
                   for n in graph[start])

    cycles = sorted({tuple(sorted((a, b))) for a, b in _edges() if reaches(b, a, {b})})
    assert cycles == []


def test_the_checker_sees_an_upward_import():
    """The check above can fail: core/metrics.py importing a study, or directions importing the
    config, is reported (function-level imports included)."""
    text = MODULES["calibrate.core.metrics"].read_text()
    planted = {"calibrate.core.metrics": text + "\nfrom calibrate.studies.study import Study\n",
               "calibrate.directions.fit": "def f():\n    from calibrate.config import spec\n"}
    assert sorted(_upward(_edges(planted))) == ["calibrate.core.metrics -> calibrate.studies.study",
                                        "calibrate.directions.fit -> calibrate.config.spec"]


def test_module_names_are_unique():
    names = [p.name for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    repeated = sorted({n for n in names if names.count(n) > 1})
    assert repeated == []


def test_the_config_tree_is_read_in_one_place():
    """Only calibrate/config/compose.py composes or reads the files of calibrate/conf (and the
    CLI's Hydra app, calibrate/run.py, whose decorator names the same tree)."""
    readers = []
    for module, path in MODULES.items():
        if module in ("calibrate.config", "calibrate.config.compose", "calibrate.run"):
            continue
        if re.search(r"\bCONF_DIR\b|initialize_config_dir|hydra\.compose|compose_api",
                     path.read_text()):
            readers.append(module)
    assert readers == []


def _members(annotation: ast.expr) -> list[str]:
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        return _members(annotation.left) + _members(annotation.right)
    return [ast.unparse(annotation)]


def _typed_or_mapping(annotation: ast.expr) -> bool:
    """``Settings | Mapping[str, Any]``: a typed value or a raw config mapping."""
    members = _members(annotation)
    raw = [m for m in members if re.fullmatch(r"(Mapping|dict|DictConfig)\[str, Any\]|DictConfig", m)]
    return bool(raw) and any(m not in ("None", *raw) for m in members)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _unit(m) not in ENTRY))
def test_no_function_below_the_entry_points_takes_a_typed_or_raw_mapping(module):
    """No ``Settings | Mapping`` parameters, no ``from_mapping`` constructors."""
    tree = ast.parse(MODULES[module].read_text())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name in ("from_mapping", "from_config"):
                bad.append(node.name)
            for arg in [*node.args.args, *node.args.kwonlyargs]:
                if arg.annotation is not None and _typed_or_mapping(arg.annotation):
                    bad.append(f"{node.name}({arg.arg}: {ast.unparse(arg.annotation)})")
    assert bad == []
