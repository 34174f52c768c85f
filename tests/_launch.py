"""Launching child processes from tests (torchrun workers, ``cipo train``, benchmarks): a free port and an
environment without the parent's launcher variables.

An in-process DeepSpeed test sets ``RANK``/``WORLD_SIZE``/``MASTER_PORT``... in ``os.environ`` (DeepSpeed needs a
world even for one process) and keeps that port bound, so a child that inherited them would try to join or bind it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for ``--master_port``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment minus the launcher variables, one thread per process (2-core machines), the
    repository importable, tokenizers quiet; ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def run_quick_benchmark(module: str, out: Path, stem: str) -> dict[str, Any]:
    """``python -m <module> --quick --out <out>`` (fails the test with its output if it fails); its JSON."""
    proc = subprocess.run([sys.executable, "-m", module, "--quick", "--out", str(out)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / f"{stem}.json").read_text())
