"""Launching child processes from tests (torchrun workers, ``cipo train``, benchmarks): a free port, an
environment without the parent's launcher variables, and :func:`run_child`, which never waits past its timeout.

An in-process DeepSpeed test sets ``RANK``/``WORLD_SIZE``/``MASTER_PORT``... in ``os.environ`` (DeepSpeed needs a
world even for one process) and keeps that port bound, so a child that inherited them would try to join or bind it.

Why not ``subprocess.run(..., timeout=...)``: on timeout it kills only the launcher, so torchrun's ranks live on
(holding ports, CPU, build locks), and the failure shows a bare ``TimeoutExpired`` without the child's output.
Here each child leads a session of its own; its whole process group is killed on timeout, on failure and when the
test itself is interrupted (Ctrl-C, pytest-timeout), and the test fails with the child's last output. Output goes
to files, not pipes, so an escaped grandchild holding a pipe open cannot block the read either.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Optional, Sequence

import pytest

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
    run_child([sys.executable, "-m", module, "--quick", "--out", str(out)], timeout=300, env=child_env(),
              what=f"python -m {module} --quick")
    return json.loads((out / f"{stem}.json").read_text())


def last_output(stdout: str, stderr: str, limit: int = 6000) -> str:
    """The end of a child's stdout and stderr (``limit`` characters of each), labelled, for a failure message."""
    def cut(text: str) -> str:
        return text if len(text) <= limit else f"[... {len(text) - limit} characters before]\n{text[-limit:]}"
    return f"--- stdout (last part) ---\n{cut(stdout)}\n--- stderr (last part) ---\n{cut(stderr)}"


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (it leads one: ``start_new_session``) and reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # unkillable (D state): nothing more a test can do; do not wait forever
        pass


def start_child(cmd: Sequence[str], stdout: IO[bytes], stderr: Optional[IO[bytes]] = None, *,
                cwd: Path = REPO, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own (so :func:`kill_group` reaches torchrun's ranks too), its output into
    the given files (stderr into stdout's when None), no stdin. The caller must bound its wait and call
    :func:`kill_group`."""
    return subprocess.Popen(list(cmd), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=subprocess.STDOUT if stderr is None else stderr, start_new_session=True)


def _read(handle: IO[bytes]) -> str:
    handle.flush()
    handle.seek(0)
    return handle.read().decode(errors="replace")


def run_child(cmd: Sequence[str], *, timeout: float, what: str = "", cwd: Path = REPO,
              env: Optional[dict[str, str]] = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` to completion within ``timeout`` seconds; its (decoded) output.

    Fails the test, with the child's last output, when it runs past ``timeout`` (its process group is killed
    first) and, with ``check``, when it exits non-zero. Whatever happens, nothing it started is left running.
    """
    what = what or " ".join(map(str, cmd[:6]))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = start_child(cmd, out, err, cwd=cwd, env=env)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            pytest.fail(f"{what}: still running after its {timeout:.0f} s timeout, killed with its process group."
                        f"\n{last_output(_read(out), _read(err))}")
        except BaseException:  # the test is interrupted (Ctrl-C, pytest-timeout): no orphans; show where it was
            kill_group(proc)
            print(f"{what}: interrupted; its last output:\n{last_output(_read(out), _read(err))}", file=sys.stderr)
            raise
        kill_group(proc)  # anything the child left running in its group (a rank it orphaned)
        done = subprocess.CompletedProcess(list(cmd), proc.returncode, _read(out), _read(err))
    if check and done.returncode != 0:
        pytest.fail(f"{what}: exit code {done.returncode}\n{last_output(done.stdout, done.stderr)}")
    return done
