"""How verl 0.9.1 finds cipo: the ``verl.plugins`` entry point (loaded by ``import verl``), or
``VERL_USE_EXTERNAL_MODULES``; each checked in a fresh interpreter. And importing the module is idempotent."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("verl")

from verl.models.transformers import monkey_patch  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils.experimental import torch_functional  # noqa: E402

import cipo.integrations.verl as cipo_verl  # noqa: E402

PROBE = """
import json, sys
import verl
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
from verl.utils.experimental.torch_functional import FusedLinearForPPO
try:
    backend = FusedLinearForPPO(impl_backend="cipo").impl_backend
except ValueError:
    backend = None
print(json.dumps({"loss": "cipo" in POLICY_LOSS_REGISTRY, "backend": backend,
                  "module": "cipo.integrations.verl" in sys.modules}))
"""

CASES = {
    # name: (environment additions, expected registration)
    "entry-point": ({}, True),
    "entry-point-by-name": ({"VERL_USE_EXTERNAL_PLUGINS": "cipo"}, True),
    "plugins-off": ({"VERL_USE_EXTERNAL_PLUGINS": "none"}, False),
    "external-modules": ({"VERL_USE_EXTERNAL_PLUGINS": "none",
                          "VERL_USE_EXTERNAL_MODULES": "cipo.integrations.verl"}, True),
}


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """Run every case at once, each in its own interpreter, from a directory outside the checkout (a checkout's
    stale ``cipo.egg-info`` on sys.path would shadow the installed entry points)."""
    cwd = tmp_path_factory.mktemp("verl_activation")
    base = {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VERL_USE_EXTERNAL_PLUGINS", "VERL_USE_EXTERNAL_MODULES")}
    base["OMP_NUM_THREADS"] = "1"
    procs = {name: subprocess.Popen([sys.executable, "-c", PROBE], cwd=cwd, env={**base, **extra},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (extra, _) in CASES.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{err[-3000:]}"
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_activation(probes, case):
    expected = CASES[case][1]
    assert probes[case] == {"loss": expected, "backend": "cipo" if expected else None, "module": expected}


def test_import_is_idempotent():
    original_forward = cipo_verl._verl_torch_functional.FusedLinearForPPO.forward.__wrapped__
    original_patch = monkey_patch.patch_forward_with_backends.__wrapped__
    reloaded = importlib.reload(cipo_verl)
    reloaded.install()
    reloaded.install()
    fused = torch_functional.FusedLinearForPPO
    # one layer of wrapping, over verl's own functions
    assert fused.forward.__wrapped__ is original_forward
    assert not hasattr(original_forward, "__wrapped__")
    assert monkey_patch.patch_forward_with_backends.__wrapped__ is original_patch
    assert not hasattr(original_patch, "__wrapped__")
    assert core_algos.get_policy_loss_fn("cipo") is reloaded.compute_policy_loss_cipo
    assert fused(impl_backend="cipo").impl_backend == "cipo"


def test_refuses_a_foreign_cipo_loss():
    ours = core_algos.POLICY_LOSS_REGISTRY["cipo"]
    try:
        core_algos.POLICY_LOSS_REGISTRY["cipo"] = lambda *args, **kwargs: None
        with pytest.raises(RuntimeError, match="not cipo's"):
            cipo_verl.install()
    finally:
        core_algos.POLICY_LOSS_REGISTRY["cipo"] = ours
