"""No cycle among the module-level imports of ``orthoopt`` modules.

Like ``tests/test_layering.py`` every module under ``orthoopt/`` is parsed with ``ast`` (nothing is
imported). Only the statements that run when the module is imported count: top-level ``import`` and
``from ... import`` statements, also inside top-level ``if``/``try``/``with`` blocks, but not those in
functions or classes (lazy imports) nor under ``if TYPE_CHECKING:``. ``from X import a`` is an edge to
the module ``X.a`` when ``a`` is a submodule, else to ``X``; relative imports (``from . import x``) are
resolved. A package's ``__init__`` is a module like any other, so its re-exports are edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "orthoopt"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


FILES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(body: list[ast.stmt]):
    """The import statements of ``body`` that run at import time (not in functions or classes)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from module_level_imports(node.body)
            yield from module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from module_level_imports(block)
        elif isinstance(node, ast.With):
            yield from module_level_imports(node.body)


def edges_of(name: str, path: Path, modules) -> set[str]:
    """The orthoopt modules module ``name`` (file ``path``) imports at module level."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in module_level_imports(ast.parse(path.read_text(encoding="utf-8"), str(path)).body):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
            continue
        if node.level:
            base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for a in node.names:
            if f"{base}.{a.name}" in modules:
                out.add(f"{base}.{a.name}")
            elif base in modules:
                out.add(base)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    return {name: edges_of(name, path, FILES) for name, path in FILES.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph has ~100 nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for component in components:  # a shortest path back to the component's first module names it
        start = min(component)
        paths = {start: [start]}
        frontier = [start]
        while frontier and start not in [w for v in frontier for w in graph[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & component):
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        cycles.append(paths[last] + [start])
    return sorted(cycles)


def test_the_graph_sees_module_level_edges_only():
    graph = import_graph()
    assert len(graph) > 80
    assert "orthoopt.solvers.base" in graph["orthoopt.solvers"]  # an __init__ re-export, relative
    assert "orthoopt.objectives.base" in graph["orthoopt.solvers.base"]  # from ..objectives.base import
    assert "orthoopt.cli" in graph["orthoopt.__main__"]  # absolute
    assert "orthoopt.models.llama2c" in graph["orthoopt.models.io"]  # from orthoopt.adapters import llama2c
    assert "orthoopt.models.gguf" not in graph["orthoopt.models.io"]  # imported inside a function only


def test_a_cycle_is_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e2", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_level_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "module-level import cycles among orthoopt modules:\n  " + \
        "\n  ".join(" -> ".join(c) for c in cycles)
