"""cipo/trainer/ has no import cycle: its modules import each other one way (setup → backend, trainer → setup,
backend, ...), and no chain of imports through the rest of ``cipo`` leads from a trainer module back to itself.

Every import statement counts, also those inside functions: a lazy import hides a cycle from the interpreter,
not from the reader.

The installed package (``cipo/`` and ``kernels/``) never imports the lab code beside it: ``bench/``,
``examples/`` and ``tests/`` are not installed, and what they hold (benchmarks, demos, test helpers) builds on the
package, never the other way round.
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


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every ``cipo`` module an import chain from ``start`` reaches (``start`` itself left out)."""
    seen, frontier = set(), [start]
    while frontier:
        frontier = [target for node in frontier for target in sorted(graph.get(node, ())) if target not in seen]
        seen.update(frontier)
    seen.discard(start)
    return seen


# The rollout session and the reward router sit below the trainer: they may know the run's config (its types and
# its error), nothing else of cipo/trainer/.
CONFIG_MODULES = {"cipo.trainer.config", "cipo.trainer.config_io"}


def test_the_rollout_session_and_the_reward_router_do_not_reach_the_trainer():
    graph = _graph()
    for name in ("cipo.rollout.session", "cipo.rewards.router"):
        assert name in graph, name
        trainer = {m for m in _reachable(graph, name) if m.startswith("cipo.trainer.")} - CONFIG_MODULES
        assert not trainer, f"{name} reaches trainer modules: {sorted(trainer)}"
    assert not {m for m in _reachable(graph, "cipo.rewards.router") if m.startswith("cipo.rollout")}


def test_evaluation_does_not_reach_the_training_loop():
    """``cipo eval`` reads a run (config, checkpoints) and samples through the rollout session; the trainer and its
    setup are not on any of its import chains."""
    graph = _graph()
    reached = _reachable(graph, "cipo.evaluation")
    assert "cipo.rollout.session" in reached and "cipo.rewards.router" in reached
    assert not reached & {"cipo.trainer.trainer", "cipo.trainer.setup"}, sorted(reached)


LAB_PACKAGES = ("bench", "examples", "tests")


def _lab_imports(source: str, filename: str) -> list[tuple[int, str]]:
    """``(line, name)`` of every import of a lab package in ``source``: import statements anywhere in the body, and
    ``importlib.import_module`` / ``__import__`` calls with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:  # a relative import stays inside the package
            names = [node.module or ""]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            names = [node.args[0].value]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in LAB_PACKAGES]
    return found


def test_the_lab_import_check_sees_every_form():
    source = ("import bench.profiling\nfrom examples import trl_demo\n"
              "def f():\n    from tests._tiny import load_tiny\n    importlib.import_module('bench.study')\n"
              "from .bench import x\nimport benchmark\n")
    assert _lab_imports(source, "<case>") == [(1, "bench.profiling"), (2, "examples"), (4, "tests._tiny"),
                                              (5, "bench.study")]


def test_the_package_never_imports_lab_code():
    paths = sorted([*PACKAGE.rglob("*.py"), *(REPO / "kernels").glob("*.py")])
    assert len(paths) > 50 and PACKAGE / "trainer" / "trainer.py" in paths
    bad = [f"{path.relative_to(REPO)}:{line}: {name}" for path in paths
           for line, name in _lab_imports(path.read_text(), str(path))]
    assert not bad, "the cipo package imports lab code (bench/, examples/, tests/):\n" + "\n".join(bad)
