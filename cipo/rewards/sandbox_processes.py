"""The host side of the local sandbox's processes: which uid a sandbox runs as, and what is left when it is done.

* uid slots: each process that runs sandboxes holds one slot (an ``flock``) for its life; as root, its programs run
  as uid ``62000 + slot``, so a uid's processes and files are this process's sandboxes' and nobody else's;
* finding and killing (fork-bomb proof) the processes of such a uid, and removing the files it left in
  world-writable directories; waiting for a process that may not be our child;
* the run directories of verifier processes that were SIGKILLed mid-run, swept once per process.

:mod:`cipo.rewards.sandbox` (what a run is: its files, the harness, the verdict) calls these; nothing here knows
about programs or tests.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

_SLOT_DIR = Path(tempfile.gettempdir()) / "cipo-sandbox-slots"
_N_SLOTS = 256
UID_BASE_FOR_SLOTS = 62000  # uid of slot k is 62000 + k (no /etc/passwd entry needed)


class SandboxUnavailable(RuntimeError):
    """No configuration of the sandbox could run even a trivial program."""


# uid slots: one per process that runs sandboxes, held by an flock for the life of the process.
_slot_lock = threading.Lock()
_slot: tuple[int, Any, int] | None = None  # (slot, open lock file, owner pid)


def _acquire_slot() -> int:
    global _slot
    with _slot_lock:
        if _slot is not None and _slot[2] == os.getpid():
            return _slot[0]
        _SLOT_DIR.mkdir(mode=0o700, exist_ok=True)
        for slot in range(_N_SLOTS):
            fh = open(_SLOT_DIR / f"{slot}.lock", "a+")  # noqa: SIM115 -- held open on purpose (the flock)
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            _slot = (slot, fh, os.getpid())
            if os.geteuid() == 0 and pids_of_uid(UID_BASE_FOR_SLOTS + slot):
                kill_uid(UID_BASE_FOR_SLOTS + slot)  # leftovers of a previous owner that was SIGKILLed
            return slot
        raise SandboxUnavailable(f"all {_N_SLOTS} sandbox uid slots are in use")


def slot_uid() -> int:
    """The uid this process's sandboxed programs run as (root only): that of its slot, acquired on first use."""
    return UID_BASE_FOR_SLOTS + _acquire_slot()


def pids_of_uid(uid: int, include_zombies: bool = False) -> list[int]:
    """pids whose real uid is ``uid``. Zombies (dead, awaiting their parent's wait) are skipped by default: one
    orphaned to the system init is reaped on the init's schedule, not ours."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                state = b""
                for line in f:
                    if line.startswith(b"State:"):
                        state = line.split()[1]
                    elif line.startswith(b"Uid:"):
                        if int(line.split()[1]) == uid and (include_zombies or state not in (b"Z", b"X")):
                            pids.append(int(entry))
                        break
        except (OSError, IndexError, ValueError):
            continue
    return pids


def kill_uid(uid: int, python: str | None = None, wait_s: float = 0.5) -> int:
    """SIGKILL every live process of ``uid``; returns how many were seen.

    A helper process running *as* ``uid`` calls ``kill(-1, SIGKILL)``: the kernel walks the task list under a lock
    that fork() also needs, so a fork bomb cannot outrun it (killing pids one by one from /proc can be outrun).
    Popen's setuid happens in C between fork and exec, safe in a threaded parent.
    """
    pids = pids_of_uid(uid)
    seen = len(pids)
    deadline = time.monotonic() + wait_s
    while pids:
        try:
            kill_bin = shutil.which("kill", path="/usr/bin:/bin")
            cmd = [kill_bin, "-9", "-1"] if kill_bin else [python or sys.executable, "-I", "-S", "-c",
                                                            "import os\ntry: os.kill(-1, 9)\nexcept OSError: pass"]
            subprocess.run(
                cmd,
                user=uid, group=uid, extra_groups=[], env={}, cwd="/", stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5, close_fds=True,
            )
        except (OSError, subprocess.SubprocessError):
            for pid in pids:  # no helper possible: one by one
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        pids = pids_of_uid(uid)
        while pids and time.monotonic() < deadline:  # SIGKILLed processes take a moment to disappear
            time.sleep(0.005)
            pids = pids_of_uid(uid)
        if time.monotonic() >= deadline:
            break
    return seen


def remove_files_of_uid(uid: int, roots: Sequence[str] = ("/tmp", "/var/tmp", "/dev/shm")) -> int:
    """Delete what ``uid`` created in world-writable directories (the only places a sandbox uid can write outside
    its work dir). Walks world-writable directories only; returns the number of entries removed."""
    removed = 0
    stack = [r for r in roots if os.path.isdir(r)]
    seen = 0
    while stack and seen < 10000:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            seen += 1
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_uid == uid:
                try:
                    if e.is_dir(follow_symlinks=False):
                        force_rmtree(e.path)
                    else:
                        os.unlink(e.path)
                    removed += 1
                except OSError:
                    pass
            elif e.is_dir(follow_symlinks=False) and st.st_mode & 0o002:
                stack.append(e.path)  # another world-writable dir (e.g. /tmp/.X11-unix): it could write there too
    return removed


_swept_in: int | None = None


def sweep_stale_run_dirs() -> None:
    """Once per process: remove run directories left by verifier processes that died mid-run (SIGKILL)."""
    global _swept_in
    if _swept_in == os.getpid():
        return
    _swept_in = os.getpid()
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        parts = name.split("-")
        if len(parts) < 4 or not name.startswith("cipo-sbx-") or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
            continue  # owner alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        force_rmtree(os.path.join(tmp, name))


def force_rmtree(path: str) -> None:
    """rmtree that survives a program having chmod-ed its own directories to 000 (non-root runs)."""

    def onerror(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


def wait_pid(pid: int, popen: subprocess.Popen | None, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``pid`` to exit (it stays a zombie: not reaped here); True if it exited.

    A pidfd works for processes that are not our children (the zygote's) and wakes us at once (Popen.wait polls).
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        if popen is None:
            raise
        try:
            popen.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            if poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                return True
            if time.monotonic() >= deadline:
                return False
    finally:
        os.close(pidfd)
