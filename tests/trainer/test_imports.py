"""cipo/trainer/ has no import cycle: its modules import each other one way (setup → backend, trainer → setup,
backend, ...), and no chain of imports through the rest of ``cipo`` leads from a trainer module back to itself.

Every import statement counts, also those inside functions: a lazy import hides a cycle from the interpreter,
not from the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "cipo"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    """Every module of ``cipo`` (the kernels, a leaf package with its own test, left out)."""
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
            if "kernels" not in p.relative_to(PACKAGE).parts}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The ``cipo`` modules that ``name`` imports anywhere in its body (the longest known prefix of each)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            parts = candidate.split(".")
            for k in range(len(parts), 0, -1):
                prefix = ".".join(parts[:k])
                if prefix in known:
                    targets.add(prefix)
                    break
    targets.discard(name)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycle_through(graph: dict[str, set[str]], start: str) -> list[str]:
    """A shortest import chain from ``start`` back to itself, or ``[]``."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for target in sorted(graph.get(node, ())):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    nxt.append(target)
        frontier = nxt
    return []


def test_the_graph_sees_the_trainer_modules_and_their_imports():
    graph = _graph()
    assert {"cipo.trainer.trainer", "cipo.trainer.backend", "cipo.trainer.setup"} <= set(graph)
    assert "cipo.trainer.backend" in graph["cipo.trainer.trainer"]
    assert "cipo.trainer.setup" in graph["cipo.trainer.trainer"]


def test_no_trainer_module_imports_itself_back():
    graph = _graph()
    cycles = [" -> ".join(chain) for name in sorted(graph) if name.startswith("cipo.trainer.")
              if (chain := _cycle_through(graph, name))]
    assert not cycles, "import cycles through cipo/trainer/:\n" + "\n".join(cycles)
