"""The layers of the house (docs/architecture.md): lower layers never import upper ones, no package imports in
a circle, and the pure packages never reach pika, not even through another module of ours."""
from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("broker", "common", "coordinator", "worker")

#: Each package's layer: a module may import modules of lower layers and of its own package only.
LAYERS = {
    "common.errors": 0,
    "common.config": 1, "common.logs": 1, "common.failpoints": 1,
    "common.data": 2, "common.metrics": 2,
    "common.learning": 3,
    "common.wire": 4,
    "common.compression": 5,
    "common.transport": 6,
    "broker": 7,
    "coordinator": 8, "worker": 8,
}
#: Pure: values in, values out. No broker client anywhere beneath them.
PURE = ("common.errors", "common.config", "common.logs", "common.failpoints", "common.data", "common.learning",
        "common.wire", "common.compression", "common.metrics", "coordinator.aggregator", "coordinator.staleness",
        "coordinator.server_optim", "coordinator.dispatch")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in FIRST_PARTY for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file (function-local imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in MODULES)
    return found


GRAPH = {name: {i for i in _imports(path) if i in MODULES} for name, path in MODULES.items()}


def _package(module: str) -> str | None:
    return next((p for p in sorted(LAYERS, key=len, reverse=True) if module == p or module.startswith(p + ".")), None)


def test_every_module_belongs_to_a_layer():
    assert [m for m in MODULES if _package(m) is None and m not in ("common",)] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer_or_a_sibling_package(module):
    own = _package(module)
    if own is None:
        return
    bad = sorted(i for i in GRAPH[module] if (p := _package(i)) not in (None, own) and LAYERS[p] >= LAYERS[own])
    assert bad == [], f"{module} (layer {LAYERS[own]}) imports {bad}"


def test_no_package_imports_in_a_circle():
    edges = {(a, b) for m, deps in GRAPH.items() for d in deps
             if (a := _package(m)) and (b := _package(d)) and a != b}
    packages = {p for edge in edges for p in edge}
    reach = {p: {b for a, b in edges if a == p} for p in packages}
    for _ in packages:  # transitive closure
        for p, q in itertools.product(packages, packages):
            if q in reach[p]:
                reach[p] |= reach[q]
    assert sorted(p for p in packages if p in reach[p]) == []


def test_no_module_cycle_within_a_package():
    def visit(node: str, stack: list[str], done: set[str]) -> list[str] | None:
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        for dep in sorted(GRAPH[node]):
            if _package(dep) == _package(node) and (cycle := visit(dep, stack + [node], done)):
                return cycle
        done.add(node)
        return None

    done: set[str] = set()
    cycles = [c for m in sorted(MODULES) if (c := visit(m, [], done))]
    assert cycles == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith(PURE)))
def test_pure_modules_never_reach_pika(module):
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        direct = _imports(MODULES[current])
        assert not any(i == "pika" or i.startswith("pika.") for i in direct), \
            f"{module} reaches pika through {current}"
        todo.extend(GRAPH[current])
