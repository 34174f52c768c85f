"""Two processes (torchrun, gloo on CPU): TRL's ``dapo`` normaliser divides the global token count by the number of
processes; cipo's mapping must do the same. TRL and cipo runs give the same losses, grad norms and weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

WORKER = Path(__file__).with_name("_two_process_worker.py")


def _launch(model_dir: str, out: Path, which: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           model_dir, str(out), which]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.with_suffix(".json").read_text())


def test_two_processes_dapo(tiny_model_dir, tmp_path):
    want = _launch(tiny_model_dir, tmp_path / "trl", "trl")
    got = _launch(tiny_model_dir, tmp_path / "cipo", "cipo")
    assert want["world_size"] == got["world_size"] == 2
    assert got["completions"] == want["completions"]
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5, abs=1e-7)
    assert got["grad_norms"] == pytest.approx(want["grad_norms"], rel=1e-5)
    for name, ref in want["params"].items():
        ref, value = torch.tensor(ref), torch.tensor(got["params"][name])
        assert float((value - ref).norm() / ref.norm()) <= 1e-5, name
