"""The package's import graph has no cycles, lazy (in-function) imports included.

Each module of ``shrink`` is parsed (not imported); every ``import shrink.x`` and
``from shrink.x import y`` anywhere in it, at top level or inside a function, is an edge to the
module it names (to ``shrink.x.y`` when ``y`` is a submodule). A package's ``__init__`` is the
node of the package itself. The implicit import of a parent package by its children is not an
edge: Python runs it before the child, whatever the child imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import shrink

ROOT = Path(shrink.__file__).parent


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: {modules it imports}}`` over the package at ``root``."""
    mods = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative imports are banned by ruff, but resolve them anyway
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import shrink.a.b` binds the deepest module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_shrink_has_no_import_cycles() -> None:
    graph = import_graph(ROOT)
    assert len(graph) > 30  # the walk really found the package
    assert cycles(graph) == []


def test_the_pipeline_layers_import_downwards_only() -> None:
    """Pure data and op knowledge sit below the stages that use them."""
    graph = import_graph(ROOT)

    def reaches(a: str, b: str) -> bool:
        seen, todo = set(), [a]
        while todo:
            v = todo.pop()
            if v == b:
                return True
            if v not in seen:
                seen.add(v)
                todo += graph[v]
        return False

    assert not reaches("shrink.plan", "shrink.rules")  # a plan is data
    assert not reaches("shrink.rules", "shrink.capture")
    assert not reaches("shrink.capture", "shrink.api")
    assert not reaches("shrink.interop.prune_masks", "shrink.capture")  # a leaf
    assert graph["shrink.interop.prune_masks"] <= {"shrink.errors"}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import pkg.a\n", [["pkg.a", "pkg.b"]]),  # a top-level cycle
        ("def f():\n    from pkg.a import x\n", [["pkg.a", "pkg.b"]]),  # a lazy one
        ("import os\n", []),
    ],
)
def test_the_cycle_finder_finds_cycles(tmp_path: Path, source: str, expected: list) -> None:
    """The checker itself can fail: a deliberately cyclic package is caught."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text(source)
    assert cycles(import_graph(pkg)) == expected
