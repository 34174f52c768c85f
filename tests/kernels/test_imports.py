"""kernels/ is a leaf package: it imports only torch, triton, the standard library and itself — never ``cipo``.

Two checks: the import statements of every module (also those inside functions: no lazy way round), and a real
import of every ``cipo.kernels`` module in a fresh interpreter where any other ``cipo`` module is blocked.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KERNELS = REPO / "kernels"
ALLOWED_TOP = {"torch", "triton", "__future__"} | set(sys.stdlib_module_names)


def _modules() -> list[Path]:
    return sorted(KERNELS.glob("*.py"))


def test_kernel_modules_import_only_torch_triton_and_themselves():
    bad = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from .x import y: this package
                    continue
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            bad += [f"{path.name}:{node.lineno}: {name}" for name in names if name.split(".")[0] not in ALLOWED_TOP]
    assert not bad, "kernels/ may import only torch, triton, the standard library and itself:\n" + "\n".join(bad)


def test_kernel_modules_load_with_the_rest_of_cipo_blocked():
    names = [f"cipo.kernels.{p.stem}" for p in _modules() if p.stem != "__init__"]
    script = f"""
import importlib, importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("cipo.") and not name.startswith("cipo.kernels"):
            raise ImportError(f"blocked: {{name}}")
        return None

sys.meta_path.insert(0, Block())
for name in {names!r}:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.startswith("cipo.") and not m.startswith("cipo.kernels"))
assert not leaked, leaked
print("ok", len({names!r}))
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]
