"""The package's import graph: no cycles, and no module importing a layer above its own
(docs/design.md §7). Read from the source with `ast`, function-level imports included:
a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import dume

PACKAGE = Path(dume.__file__).parent

# Bottom to top. A module may import its own layer and those below it.
LAYERS = (
    ("errors", "checks"),
    ("runtime",),
    ("arch",),
    ("checkpoint",),
    ("moe",),
    ("text",),
    ("corpora",),
    ("stats",),
    ("train",),
    ("routers",),
    ("upcycle",),
    ("clm",),
    ("reasoning",),
    ("report",),
    ("cli", "__main__"),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{name}: relative import (the package imports itself absolutely)")
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dume":
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "dume"]
            deps |= {t for t in targets if t in modules and t != name and t != "dume"}
        graph[name] = deps
    return graph


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "dume"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: no layer in tests/test_layers.py LAYERS (add its package there)")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_a_layer_above_it():
    graph = import_graph()
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() if m != "dume" for d in deps
                    if layer_of(d) > layer_of(m))
    assert upward == []
