"""The package's import graph: no cycle (lazy imports inside functions included) and no engine reaching up into a
command. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import lightning_probes

PACKAGE = "lightning_probes"
ROOT = Path(lightning_probes.__file__).resolve().parent.parent
# Only the command-line front ends may import the commands.
COMMAND_USERS = ("lightning_probes.cli", "lightning_probes.commands")


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: modules of the package it imports anywhere in its source}``; ``from pkg import sub`` counts as an
    import of the submodule ``pkg.sub`` when there is one, else of ``pkg``."""
    modules = {}
    for path in (root / package).rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == package:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == package]
            for target in targets:
                while target not in modules:
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle_through_lazy_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "a.py").write_text("from pkg.sub.b import f\n")
    (package / "sub" / "b.py").write_text("def f():\n    from pkg.sub import c\n")
    (package / "sub" / "c.py").write_text("import os\n\ndef g():\n    from pkg.sub.a import f\n")
    (package / "d.py").write_text("from pkg.sub.a import f\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub.b"] == {"pkg.sub.c"}
    assert cycles(graph) == [["pkg.sub.a", "pkg.sub.b", "pkg.sub.c"]]


def test_the_package_has_no_import_cycle():
    graph = import_graph(ROOT, PACKAGE)
    assert "lightning_probes.studies.runner" in graph and os.path.isdir(ROOT / PACKAGE / "studies")
    assert cycles(graph) == []


def test_only_the_command_line_imports_the_commands():
    graph = import_graph(ROOT, PACKAGE)
    reaching_up = sorted((module, target) for module, targets in graph.items() for target in targets
                         if target.startswith("lightning_probes.commands") and not module.startswith(COMMAND_USERS))
    assert reaching_up == []
