"""DeepSpeed's Ulysses sequence parallelism (``UlyssesSPAttentionHF``) on 2 CPU ranks over gloo.

One sequence split over the 2 ranks: the gathered hidden states equal a one-process forward exactly (the same
attention over all tokens, per head group), and the summed gradients equal it to 1e-5 relative. Two *packed*
sequences: with sdpa DeepSpeed drops the mask, so attention crosses the sequence boundary — the documented reason
cipo does not use Ulysses with sdpa on packed micro-batches (flash_attention_2's varlen path follows position_ids;
not testable without a GPU).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ulysses")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(REPO / "tests" / "long_context" / "ulysses_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_one_sequence_over_two_ranks_equals_one_process(results):
    for r in results:
        assert r["world"] == 2
        assert r["one_sequence"]["hidden_max_abs"] <= 1e-5
        assert r["one_sequence"]["grad_max_rel"] <= 1e-5


def test_packed_sequences_with_sdpa_are_not_isolated(results):
    for r in results:
        assert r["two_packed_sequences"]["hidden_max_abs"] > 1e-2
