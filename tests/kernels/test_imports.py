"""Import rules of the loss code.

1. kernels/ is a leaf package: it imports only torch, triton, the standard library and itself — never ``cipo``.
   Checked on the import statements of every module (also those inside functions: no lazy way round), and by a real
   import of every ``cipo.kernels`` module in a fresh interpreter where any other ``cipo`` module is blocked.
2. References are only references: no production module imports a ``*_ref`` module (the float64 oracles the tests
   and the naive benchmark use), on any code path. Production is every module of the installed ``cipo`` package
   (``cipo/`` and ``kernels/``) whose name does not end in ``_ref``; a reference may build on another reference.
   One exception, named in :data:`REFERENCE_IMPORTERS`: the trainer's unfused path (``actor.fused_loss: false``)
   exists to run the fused loss's end-to-end reference inside the trainer, for comparisons, so it calls the one
   shared reference rather than a second copy of it. Checked on the import statements, and by running the public
   loss entries on CPU tensors in a fresh interpreter and finding no reference module loaded.
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

#: Production modules allowed to import a reference, and the only references each may import.
REFERENCE_IMPORTERS = {"cipo.trainer.backend": {"cipo.fused_loss_ref"}}


def _modules() -> list[Path]:
    return sorted(KERNELS.glob("*.py"))


def _package_modules() -> dict[str, Path]:
    """Every module of the installed ``cipo`` package by dotted name (``kernels/`` is installed as ``cipo.kernels``)."""
    out = {}
    for path in sorted((REPO / "cipo").rglob("*.py")):
        parts = ("cipo", *path.relative_to(REPO / "cipo").with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in _modules():
        out["cipo.kernels" if path.stem == "__init__" else f"cipo.kernels.{path.stem}"] = path
    return out


def _imported_names(name: str, path: Path) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of everything ``path`` imports, relative imports resolved against module ``name``;
    ``from M import a`` yields ``M`` and ``M.a`` (``a`` may be a submodule)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _is_reference(name: str) -> bool:
    return any(part.endswith("_ref") for part in name.split("."))


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


def test_the_import_resolver_sees_relative_and_lazy_imports():
    """The rule below is only as good as :func:`_imported_names`: it must resolve what the code actually writes."""
    modules = _package_modules()
    backend = {n for _, n in _imported_names("cipo.trainer.backend", modules["cipo.trainer.backend"])}
    assert "cipo.fused_loss_ref.materialized_policy_loss" in backend  # ``from ..fused_loss_ref import``, in a function
    torch_path = {n for _, n in _imported_names("cipo.kernels.fused_linear_policy_loss_torch",
                                                modules["cipo.kernels.fused_linear_policy_loss_torch"])}
    assert "cipo.kernels.policy_loss_torch.token_terms" in torch_path
    assert "cipo.fused_loss_ref" in modules and "cipo.kernels.linear_logprob_ref" in modules


def test_production_modules_never_import_a_reference():
    bad = []
    for name, path in _package_modules().items():
        if _is_reference(name):
            continue  # a reference may build on another reference
        allowed = REFERENCE_IMPORTERS.get(name, set())
        for line, imported in _imported_names(name, path):
            if _is_reference(imported) and not any(imported == a or imported.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(REPO)}:{line}: {imported}")
    assert not bad, ("production code must not import a *_ref module (references are test oracles; the CPU path is "
                     "NAME_torch.py):\n" + "\n".join(bad))


def test_the_loss_entries_load_no_reference_on_cpu():
    """Run every public loss entry on CPU tensors (the torch paths, where a reference would most easily creep in as
    a fallback) and check that no ``*_ref`` module was loaded."""
    script = """
import sys
import torch
import cipo
from cipo import PackedBatch, PolicyLossConfig, SequenceSample

for name in cipo.__all__:
    getattr(cipo, name)
seqs = [SequenceSample([1, 2], [3, 4, 5], reward=float(i % 2), group_id=i // 2, stream=i // 2,
                       old_logp=[-1.0] * 3) for i in range(4)]
batch = PackedBatch.from_sequences(seqs)
hidden = torch.randn(batch.num_tokens, 8, requires_grad=True)
weight = torch.randn(11, 8, requires_grad=True)
config = PolicyLossConfig(entropy_coef=0.01)
loss, _ = cipo.fused_linear_policy_loss(hidden, weight, batch, config)
loss.backward()
logp, ent = cipo.linear_logprob(hidden, weight, batch.targets, 1.0, True)
loss, _ = cipo.cipo_policy_loss(logp, batch, config, entropy=ent)
loss.backward()
cipo.policy_loss(logp.detach(), batch.old_logp, torch.ones(batch.num_seqs), batch.loss_mask, PolicyLossConfig(),
                 cu_seqlens=batch.cu_seqlens)
cipo.group_advantages(batch.reward, batch.group_id)
loaded = sorted(m for m in sys.modules if m.startswith("cipo") and any(p.endswith("_ref") for p in m.split(".")))
assert not loaded, loaded
print("ok")
"""
    env = dict(os.environ, CIPO_FORCE_TRITON="0")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]
