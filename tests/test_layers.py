"""Layers point down: cli -> processors / ml / export / catalog -> core.

Every module of the package is parsed (not imported) and each of its imports --
at the top, inside functions, under ``TYPE_CHECKING``, and
``importlib.import_module("stacchip...")`` with a literal name -- is checked
against the layer table below. A module the table does not place fails too:
a new module has to say where it sits.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "stacchip"

#: Top-level modules (and packages) of the core: they import only each other.
CORE = {
    "__init__", "errors", "items", "projection", "grid", "qa", "platforms", "encodings", "indexer", "index",
    "compacted", "reader", "chipper", "storage", "utils", "console", "demo",
    "schema", "filters", "scan",  # the index schema, query filters, reading index rows without pyarrow.dataset
    "tiles",  # the tile read path under reader/chipper (a package of the core)
}
#: Edge packages and what each may import besides itself.
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "export": {"core"},
    "ml": {"core", "export"},
    "catalog": {"core", "export"},
    "processors": {"core", "export", "catalog"},
    "cli": {"core", "export", "ml", "catalog", "processors"},
}
#: The entry points, the only modules that may import ``stacchip.cli``.
CLI_IMPORTERS = {"stacchip.cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The layer of a ``stacchip...`` module, or None when the table does not place it."""
    parts = module.split(".")
    if parts == ["stacchip"]:
        return "core"
    top = parts[1]
    if top in CORE:
        return "core"
    if top == "cli":
        return "cli"
    if top in ("export", "ml", "catalog", "processors"):
        return top
    return None


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Modules named by ``from X import a, b``: ``X.a`` where ``a`` is a submodule of the package
    (``from stacchip import storage``), else ``X``."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    out = []
    for alias in node.names:
        candidate = f"{prefix}.{alias.name}"
        path = PACKAGE.parent.joinpath(*candidate.split("."))
        out.append(candidate if path.with_suffix(".py").is_file() or path.is_dir() else prefix)
    return out


def imports_in(text: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``stacchip`` import in the source ``text`` of ``module``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(text)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = _resolve_from(node, module, is_package)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        found.extend((node.lineno, n) for n in names if n == "stacchip" or n.startswith("stacchip."))
    return found


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``stacchip`` import in the file."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_is_found():
    names = {module_name(p) for p in MODULES}
    assert {"stacchip.index", "stacchip.cli", "stacchip.encodings", "stacchip.compacted", "stacchip.export"} <= names


#: Known exceptions, one module each, to be removed by moving what they import down:
#: bulk indexing runs as array tasks through the processors' job plumbing
#: (task index from the scheduler's variables, worker pools, output roots).
SIDEWAYS: dict[str, set[str]] = {
    "stacchip.catalog.bulk": {"stacchip.processors.jobs"},
}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down(path: Path):
    module = module_name(path)
    own = layer_of(module)
    assert own is not None, f"{module} is in no layer: add it to the table in tests/test_layers.py"
    entry_point = path.name == "__main__.py"
    wrong = []
    for line, target in imports_of(path):
        theirs = layer_of(target)
        if theirs is None:
            wrong.append(f"line {line}: {target} is in no layer")
        elif target == "stacchip.cli" or target.startswith("stacchip.cli."):
            if module not in CLI_IMPORTERS and not entry_point:
                wrong.append(f"line {line}: imports {target}; only the entry points import the CLI")
        elif target in SIDEWAYS.get(module, set()):
            continue
        elif theirs != own and theirs not in ALLOWED[own]:
            wrong.append(f"line {line}: {own} module imports {target} ({theirs})")
    assert not wrong, f"{module} ({own}) points up:\n  " + "\n  ".join(wrong)


def test_the_checker_sees_every_kind_of_import():
    """Function-level, ``TYPE_CHECKING``, relative and ``import_module`` imports all count."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from stacchip import storage, errors\n"
        "if TYPE_CHECKING:\n    from stacchip.ml import dataset\n"
        "def f():\n    from ..processors import prechip\n"
        "    import importlib\n    importlib.import_module('stacchip.cli')\n"
    )
    found = [name for _, name in imports_in(source, "stacchip.export.probe")]
    assert found == ["stacchip.storage", "stacchip.errors", "stacchip.ml.dataset",
                     "stacchip.processors.prechip", "stacchip.cli"]
    assert [layer_of(name) for name in found] == ["core", "core", "ml", "processors", "cli"]
    assert layer_of("stacchip.somewhere_new") is None


def import_graph() -> dict[str, set[str]]:
    """``module -> the package modules it imports`` (every kind of import, as above)."""
    names = {module_name(p) for p in MODULES}
    return {module_name(p): {t for _, t in imports_of(p) if t in names and t != module_name(p)} for p in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one
    module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles():
    """No two modules import each other, directly or through others -- function-level
    imports included: a name two modules share lives in the lower one."""
    found = cycles(import_graph())
    assert not found, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": {"e"}, "f": set()}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["e", "e2"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
