"""DeepSpeed's start-up never waits forever on a JIT build lock (torch's ``FileBaton``: ``<root>/<op>/lock``).

A build that was killed leaves the lock behind, and every later load of that op polled for it forever at 0 % CPU.
Here, in a temporary ``TORCH_EXTENSIONS_DIR``: the shm collective op is no longer built at all (so its stale lock
is harmless), a stale lock of an op DeepSpeed may build stops ``cipo train`` at once with the file to delete, a
lock held by a running process is a build in progress (waited for, announced), one held by a stopped process is
refused. Every child process runs under a timeout and the test fails with its last output.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from cipo.trainer.build_locks import (  # noqa: E402
    StaleBuildLockError,
    check_build_locks,
    deepspeed_op_names,
    extensions_root,
)
from tests._launch import REPO, child_env, kill_group, run_child, start_child  # noqa: E402

# Child start-up is mostly importing torch + DeepSpeed: ~10-30 s on 2 busy cores. A hang would be forever.
CHILD_TIMEOUT = 240

# Holds the lock as FileBaton does (created with O_EXCL, kept open), then optionally stops itself (Ctrl-Z).
HOLDER = """
import os, signal, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL)
open(sys.argv[2], "w").close()
if sys.argv[3] == "stop":
    os.kill(os.getpid(), signal.SIGSTOP)
time.sleep(300)
"""


def _stale_lock(root: Path, op: str) -> Path:
    (root / op).mkdir(parents=True)
    lock = root / op / "lock"
    lock.touch()
    return lock


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


@pytest.fixture
def holder(tmp_path: Path):
    """Start a process holding ``lock`` (``mode`` "run" or "stop"); yields a starter, kills what it started."""
    started = []

    def start(lock: Path, mode: str) -> int:
        ready, log_path = tmp_path / f"ready_{len(started)}", tmp_path / f"holder_{len(started)}.log"
        log = open(log_path, "wb")
        proc = start_child([sys.executable, "-c", HOLDER, str(lock), str(ready), mode], log)
        started.append((proc, log))
        deadline = time.monotonic() + 60
        while not ready.exists() or (mode == "stop" and _state(proc.pid) not in "Tt"):
            assert proc.poll() is None, f"lock holder died: {log_path.read_text()}"
            assert time.monotonic() < deadline, "lock holder not ready within 60 s"
            time.sleep(0.05)
        return proc.pid

    yield start
    for proc, log in started:
        kill_group(proc)  # SIGKILL ends a stopped process too
        log.close()


def test_stale_lock_is_refused_with_the_file_to_delete(tmp_path: Path):
    lock = _stale_lock(tmp_path, "cpu_adam")
    with pytest.raises(StaleBuildLockError) as info:
        check_build_locks(root=tmp_path, names=["cpu_adam"])
    message = str(info.value)
    assert f"rm {lock}" in message and "no process on this machine holds it" in message
    assert lock.exists(), "the lock must be left for the user to delete (another machine may share the folder)"


def test_no_lock_or_other_ops_pass(tmp_path: Path):
    _stale_lock(tmp_path, "some_other_extension")
    (tmp_path / "cpu_adam").mkdir()  # built before, unlocked
    check_build_locks(root=tmp_path, names=["cpu_adam", "fused_adam"])


def test_lock_held_by_a_running_build_is_waited_for(tmp_path: Path, holder, capsys):
    (tmp_path / "cpu_adam").mkdir()
    lock = tmp_path / "cpu_adam" / "lock"
    pid = holder(lock, "run")
    check_build_locks(root=tmp_path, names=["cpu_adam"])  # no error: DeepSpeed will wait for the build
    assert f"being built by process {pid}" in capsys.readouterr().err


def test_lock_held_by_a_stopped_process_is_refused(tmp_path: Path, holder):
    (tmp_path / "cpu_adam").mkdir()
    lock = tmp_path / "cpu_adam" / "lock"
    pid = holder(lock, "stop")
    with pytest.raises(StaleBuildLockError, match=f"stopped process.*pid {pid}.*kill -CONT {pid}"):
        check_build_locks(root=tmp_path, names=["cpu_adam"])


def test_extensions_root_is_where_torch_builds(tmp_path: Path, monkeypatch):
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert extensions_root() / "probe" == Path(_get_build_directory("probe", verbose=False))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert extensions_root() / "probe" == Path(_get_build_directory("probe", verbose=False))


def test_checked_ops_are_deepspeeds_less_the_shm_op():
    names = deepspeed_op_names()
    assert "deepspeed_shm_comm" not in names
    assert "cpu_adam" in names or "fused_adam" in names  # ZeRO-Offload's optimizer op, on CPU or CUDA


def test_deepspeed_start_up_neither_builds_nor_waits_for_the_shm_op(tmp_path: Path):
    # Before: every DeepSpeed start-up on CPU JIT-built deepspeed_shm_comm (~100 s of CPU) and, with its lock left
    # behind, waited forever. Now the op is skipped: a stale lock of it is irrelevant and nothing is built.
    ext = tmp_path / "ext"
    _stale_lock(ext, "deepspeed_shm_comm")
    code = ("from cipo.trainer.distributed import init_distributed\n"
            "ctx = init_distributed('cpu', required=True)\n"
            "import deepspeed.comm.comm as comm\n"
            "print('started', ctx.world_size, comm.cdb.shm_comm_op)\n")
    proc = run_child([sys.executable, "-c", code], timeout=CHILD_TIMEOUT, env=child_env(TORCH_EXTENSIONS_DIR=str(ext)),
                     what="init_distributed with a stale shm lock")
    assert "started 1 None" in proc.stdout, proc.stdout[-3000:]
    assert sorted(p.name for p in (ext / "deepspeed_shm_comm").iterdir()) == ["lock"]  # nothing built


def test_cipo_train_with_a_stale_build_lock_stops_at_once(tmp_path: Path):
    # A ZeRO-Offload run (DeepSpeed's CPU Adam, built on first use) after an interrupted build of that op: before,
    # `cipo train` waited forever at 0 % CPU; now it stops before DeepSpeed starts, naming the file to delete.
    ext = tmp_path / "ext"
    lock = _stale_lock(ext, "cpu_adam")
    cmd = [sys.executable, "-m", "cipo.cli", "train", str(REPO / "configs" / "tiny.yaml"),
           "--set", "actor.strategy=deepspeed", "--set", "deepspeed.offload_optimizer=true",
           "--set", f"trainer.run_dir={tmp_path / 'run'}", "--set", "trainer.progress=false"]
    proc = run_child(cmd, timeout=CHILD_TIMEOUT, env=child_env(TORCH_EXTENSIONS_DIR=str(ext)), check=False,
                     what="cipo train with a stale cpu_adam lock")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"cipo: error: stale build lock {lock}" in proc.stderr and f"rm {lock}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert lock.exists() and not (tmp_path / "run").exists()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_lock_holders_sees_this_process(tmp_path: Path):
    from cipo.trainer.build_locks import lock_holders

    lock = tmp_path / "lock"
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)
    try:
        assert os.getpid() in lock_holders(lock)
    finally:
        os.close(fd)
    assert os.getpid() not in lock_holders(lock)
