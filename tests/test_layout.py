"""The layout the design notes promise: imports point one way, no cycles, thin entry points."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("resnet_flax", "experiments", "benchmarks")
ENTRY_POINT_LINES = 90  # "about 80": config in, one or two library calls


def module_name(path: Path) -> str:
    """The dotted module name of a source file under the repository root."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []:
            found[module_name(path)] = path
    return found


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside functions (relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def project_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    names = modules()
    return {name: {i for i in imports_of(path) if i in names} for name, path in names.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_anywhere():
    # Fails when two modules import each other, directly or through others, even lazily.
    assert find_cycle(project_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    # Fails when find_cycle misses a cycle (the test above could then never fail).
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name,path", sorted(modules().items()))
def test_library_never_imports_hydra_experiments_or_benchmarks(name, path):
    if not name.startswith("resnet_flax"):
        pytest.skip("an entry point")
    banned = ("hydra", "omegaconf", "experiments", "benchmarks")
    bad = sorted(i for i in imports_of(path) if i.split(".")[0] in banned)
    assert not bad, f"{name} imports {bad}"


def entry_points() -> list[Path]:
    """The runnable modules of experiments/ (those with a __main__ block)."""
    return [p for p in sorted((ROOT / "experiments").glob("*.py")) if "__main__" in p.read_text()]


@pytest.mark.parametrize("path", entry_points(), ids=lambda p: p.name)
def test_entry_points_are_thin_and_import_no_other_entry_point(path):
    lines = len(path.read_text().splitlines())
    assert lines <= ENTRY_POINT_LINES, f"{path.name} has {lines} lines"
    others = {module_name(p) for p in entry_points()} - {module_name(path)}
    assert not imports_of(path) & others, f"{path.name} imports another entry point"
