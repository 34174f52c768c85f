"""DeepSpeed's just-in-time built ops and their build locks: DeepSpeed's start-up must never wait forever.

DeepSpeed compiles some C++ ops on first use through ``torch.utils.cpp_extension.load``. That holds a lock file,
``<extensions root>/<op>/lock`` (torch's ``FileBaton``: an empty file created with ``O_EXCL`` and kept open by the
builder until it deletes it at the end). Every later load of the op, even of one already built, first waits for
that file to disappear, polling forever at 0 % CPU. The file records no owner, so a build that was killed (Ctrl-C
twice, a test timeout, an OOM kill) leaves a lock that hangs every later run.

Two defences, applied by :func:`prepare_deepspeed` before DeepSpeed initialises its communication backend:

* DeepSpeed's CPU shared-memory collective op (``deepspeed_shm_comm``), which every CPU start-up would otherwise
  build (~100 s of CPU), is switched off: it only speeds up ``inference_all_reduce`` (tensor-parallel inference),
  which training never calls; gloo does all of cipo's collectives.
* The build locks of DeepSpeed's ops are checked. The owner of a lock is the process that holds the file open;
  on Linux ``/proc/<pid>/fd`` shows it. A lock that no process on this machine holds is stale: cipo raises
  :class:`StaleBuildLockError` naming the file to delete, rather than deleting it itself, because a build on
  another machine or container sharing the directory would be invisible here. A lock held by a stopped process
  (Ctrl-Z) is refused the same way; one held by a running process is a build in progress, announced on stderr
  and waited for.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch

# The op cipo never needs (see the module docstring); DeepSpeed's builder for it is looked up by this class name.
SHM_COMM_BUILDER = "ShareMemCommBuilder"


class StaleBuildLockError(RuntimeError):
    """A DeepSpeed op's build lock that DeepSpeed would wait on forever (no live owner, or a stopped one)."""


def extensions_root() -> Path:
    """The folder torch builds JIT extensions in (``<root>/<op name>/``), as ``torch.utils.cpp_extension`` picks it:
    ``$TORCH_EXTENSIONS_DIR``, else ``<user cache>/torch_extensions/py<XY>_<cpu|cuXY|rocmXY>``."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit is not None:
        return Path(explicit)
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def deepspeed_op_names() -> list[str]:
    """The build-folder names of every op DeepSpeed can JIT-build on this accelerator, less the disabled shm op."""
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    skipped = _shm_comm_name()
    return sorted(name for name in ALL_OPS if name != skipped)


def _shm_comm_name() -> Optional[str]:
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().get_op_builder(SHM_COMM_BUILDER)
    return None if builder is None else builder.NAME


def disable_shm_comm() -> None:
    """Make DeepSpeed skip its shared-memory collective op (never built, never loaded) in this process.

    ``deepspeed.comm.torch.build_shm_op`` builds the op only when ``deepspeed.ops.__compatible_ops__`` marks it
    compatible; that dict is computed once per process and kept, so marking it here lasts. Call before
    ``deepspeed.init_distributed`` / ``deepspeed.initialize``. No-op on accelerators without the op (CUDA).
    """
    name = _shm_comm_name()
    if name is None:
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[name] = False


def lock_holders(lock: Path) -> Optional[list[int]]:
    """Ids of the processes on this machine that hold ``lock`` open (its builders); None where that cannot be
    known (no ``/proc``). Processes whose descriptors this user may not read are skipped (the default extensions
    folder is per user)."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(lock)
    holders = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone, or another user's process
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    holders.append(int(entry.name))
                    break
            except OSError:
                continue
    return holders


def _process_state(pid: int) -> tuple[str, str]:
    """``(state letter, command line)`` of a process (``("?", "")`` if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        state = stat[stat.rindex(")") + 2]  # the command name in parentheses may hold spaces
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return "?", ""
    return state, " ".join(cmdline.replace("\0", " ").split())[:200]  # one line, even for `python -c` scripts


def check_build_locks(root: Optional[Path] = None, names: Optional[Iterable[str]] = None) -> None:
    """Refuse to start where DeepSpeed would wait forever on an op's build lock; announce a live build.

    Args:
        root: the extensions folder (default :func:`extensions_root`).
        names: op build-folder names to check (default :func:`deepspeed_op_names`).

    Raises:
        StaleBuildLockError: a lock that no process on this machine holds (an interrupted build), or that only
            stopped processes hold; the message names the file and what to do.
    """
    root = extensions_root() if root is None else root
    for name in deepspeed_op_names() if names is None else names:
        lock = root / name / "lock"
        if not lock.exists():
            continue
        holders = lock_holders(lock)
        if not lock.exists():  # released while we looked: the build just finished
            continue
        if holders is None:
            print(f"cipo: warning: DeepSpeed's build lock {lock} exists and this system cannot tell who holds it; "
                  "if the run then waits at 0 % CPU, no build is running: stop it, delete that file and run again",
                  file=sys.stderr, flush=True)
            continue
        if not holders:
            raise StaleBuildLockError(
                f"stale build lock {lock}: no process on this machine holds it (a build of DeepSpeed's {name!r} op "
                "was interrupted), and DeepSpeed would wait for it forever. Delete it and run again:\n"
                f"    rm {lock}\n"
                "(Only if another machine or container shares this folder and is building that op right now, "
                "let it finish instead.)")
        states = {pid: _process_state(pid) for pid in holders}
        running = [pid for pid, (state, _) in states.items() if state not in "Tt"]
        if not running:
            who = "; ".join(f"pid {pid}: {cmd or '?'}" for pid, (_, cmd) in states.items())
            raise StaleBuildLockError(
                f"build lock {lock} is held only by stopped process(es) ({who}); DeepSpeed would wait for it "
                f"forever. Resume them (kill -CONT {' '.join(map(str, holders))}) or end them, then run again")
        pid = running[0]
        print(f"cipo: DeepSpeed's {name!r} op is being built by process {pid} ({states[pid][1] or '?'}); waiting for "
              f"its lock {lock}", file=sys.stderr, flush=True)


def prepare_deepspeed() -> None:
    """Before DeepSpeed initialises: skip the shm op, then :func:`check_build_locks`. Idempotent, ~0.1 s."""
    disable_shm_comm()
    check_build_locks()
