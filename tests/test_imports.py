"""The package's dependencies point one way: no module imports, at any depth and at any place in its code
(module level or inside a function), a module that imports it back. And the planner stays torch-free.

Imports under ``if TYPE_CHECKING:`` are left out: they never run, so they only name types for annotations."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "latentmoe"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those inside an ``if TYPE_CHECKING:`` block."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                yield child
                yield from runtime_nodes(child)
            continue
        yield node
        yield from runtime_nodes(node)


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """Package modules ``path`` imports anywhere in its code (``from a.b import c`` is a.b.c if that is a module,
    else a.b); relative imports resolved against ``name``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        out |= {t for t in targets if t in known and t != name}
    return out


def import_graph() -> nx.DiGraph:
    mods = modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for name, path in mods.items():
        graph.add_edges_from((name, target) for target in imported(path, name, set(mods)))
    return graph


def test_the_import_scan_finds_a_cycle_when_there_is_one(tmp_path):
    graph = nx.DiGraph([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")])
    assert [sorted(c) for c in nx.simple_cycles(graph)] == [["a", "b", "c"]]


def test_the_scan_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert graph.has_edge("latentmoe.cli.train", "latentmoe.train.run")  # imported inside run()
    assert graph.has_edge("latentmoe.train.trainer", "latentmoe.train.strategy")
    assert graph.number_of_edges() > 200


def test_the_package_has_no_import_cycle():
    cycles = sorted(sorted(c) for c in nx.simple_cycles(import_graph()))
    assert cycles == []


def test_dependencies_point_one_way_between_layers():
    """cli -> serve/train/infer/parallel -> model/checkpoint/data/fp8/hf -> config/io: nothing low imports
    something high, parallel may use train but not the reverse, the planner imports no torch-based module."""
    graph = import_graph()
    low = ("latentmoe.config", "latentmoe.io", "latentmoe.limits")
    torch_free = {"latentmoe.config", "latentmoe.io", "latentmoe.limits"}
    for source, target in graph.edges:
        if source.startswith(low):
            assert target.startswith(low), (source, target)
        if source.startswith("latentmoe.train"):
            assert not target.startswith(("latentmoe.parallel", "latentmoe.cli", "latentmoe.serve")), (source, target)
        if source.startswith(("latentmoe.model", "latentmoe.checkpoint", "latentmoe.fp8", "latentmoe.data")):
            assert not target.startswith(("latentmoe.train", "latentmoe.infer", "latentmoe.parallel", "latentmoe.cli",
                                          "latentmoe.serve")), (source, target)
        if source.startswith("latentmoe.plan"):
            assert target.startswith("latentmoe.plan") or target in torch_free | {"latentmoe.cli.plan"}, (source,
                                                                                                          target)
