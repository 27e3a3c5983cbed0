"""The repository's layering, checked on the source: no import cycle between project modules, the first
stage (rewrite/) and eval.py independent of loaders/, loaders/ (the read side) independent of packing/
(the write side), and no file citing notes a clone does not have.

Imports are read with `ast`, function-level ones included (a lazy import is still a dependency).
`from pkg import name` counts as an import of pkg.name when that is a module, else of pkg; importing
a submodule is not counted as importing its package's __init__ (Python runs it, but it is not a
design dependency, and lazy loaders in __init__ would otherwise make every package a cycle).
"""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

from tests.conftest import REPO

# Spelled in two pieces so that this file does not cite them itself.
NOTES_OUTSIDE = (b"." + b"brief", b".." + b"/shared")
SKIP_DIRS = {".venv", ".git", "data", "results", ".cache", "node_modules", "build", "dist"}


def project_files() -> dict[str, Path]:
    """module name -> file, for every .py file of the project (packages by their __init__)."""
    mods = {}
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts:
            mods[".".join(parts)] = path
    return mods


def imported_modules(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()

    def add(target: str) -> None:
        while target and target not in mods:        # a name inside a module: the module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                full = f"{module}.{alias.name}" if module else alias.name
                add(full if full in mods else module)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = project_files()
    return {name: imported_modules(name, path, mods) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}              # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "rewrite.engine_base" in graph["rewrite.eda"]           # relative: from .engine_base import Engine
    assert "rewrite.eda" in graph["rewrite.engines"]               # inside make_engine
    assert "evaluation.runner" in graph["train"]                   # inside zeroshot_eval
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_rewrite_and_eval_do_not_import_loaders():
    graph = import_graph()
    for name in ["eval"] + [m for m in graph if m == "rewrite" or m.startswith("rewrite.")]:
        bad = sorted(m for m in graph[name] if m == "loaders" or m.startswith("loaders."))
        assert not bad, f"{name} imports {bad}"


def test_loaders_read_side_imports_nothing_from_the_write_side():
    """loaders/ reads packed data; packing/ writes it. The write side may use the read side's format
    module and store reader, never the other way round."""
    graph = import_graph()
    for name in [m for m in graph if m == "loaders" or m.startswith("loaders.")]:
        bad = sorted(m for m in graph[name] if m == "packing" or m.startswith("packing."))
        assert not bad, f"{name} imports {bad}"


def test_no_file_cites_notes_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    offenders = []
    for rel in filter(None, files.decode().split("\0")):
        path = REPO / rel
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_bytes()
        for needle in NOTES_OUTSIDE:
            if needle in text:
                offenders.append(f"{rel}: {needle.decode()}")
    assert not offenders, offenders
