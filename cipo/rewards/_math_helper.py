"""Math judging in a helper *process* with a hard wall-clock deadline.

Why a process: math-verify's timeouts use ``SIGALRM``, which only the main thread of a process receives, and
sympy's big-integer arithmetic runs in C while holding the GIL. A verification running in a thread can therefore be
neither interrupted nor even waited on with a timeout (the waiting thread needs the GIL to wake up). So
:class:`~cipo.rewards.MathVerifier` sends the judging of a call made off the main thread (or of every call, with
``isolation="process"``) to a helper process whose main thread has the alarms; the caller waits on a pipe with a
deadline (``poll``, which releases the GIL), and a helper past the deadline is SIGKILLed and replaced.

Helpers are started on demand, one per concurrently calling thread, and reused. They are plain ``subprocess``
children (not ``multiprocessing``), so they never re-import the caller's ``__main__`` module. A helper exits on EOF
of its request pipe or when its parent dies (it polls ``getppid``); its address space is capped.
Protocol: one JSON object per line each way; the helper first sends ``{"ready": true}``.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from typing import Any

_START_TIMEOUT_S = 60.0  # imports (sympy, math-verify) take 1-3 s; a helper not ready by then is an error
_MEMORY_BYTES = 4 << 30  # RLIMIT_AS of a helper: a runaway evaluation dies with MemoryError, not the machine
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds `cipo/`


class HelperTimeout(Exception):
    """The helper did not answer within the deadline (it has been killed)."""


class HelperError(Exception):
    """The helper could not be started or died (it has been killed)."""


class _Helper:
    def __init__(self) -> None:
        code = ("import sys; sys.path.insert(0, %r); "
                "from cipo.rewards._math_helper import helper_main; helper_main()" % _PACKAGE_ROOT)
        # start_new_session: a terminal's Ctrl-C goes to the caller, not here (the caller decides); no preexec_fn,
        # which is unsafe in a threaded parent.
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(os.getpid())], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0, close_fds=True, start_new_session=True)
        self._buf = b""
        self._poller = select.poll()  # poll, not select: no FD_SETSIZE limit in processes with many fds
        self._poller.register(self.proc.stdout.fileno(), select.POLLIN)

    def _read_message(self, deadline: float, what: str) -> dict:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HelperTimeout(what)
            if not self._poller.poll(max(1, int(remaining * 1000))):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise HelperError(f"math helper process exited during {what} (exit code {self.proc.poll()})")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def wait_ready(self) -> None:
        try:
            msg = self._read_message(time.monotonic() + _START_TIMEOUT_S, "start-up")
        except HelperTimeout:
            raise HelperError(f"math helper process not ready after {_START_TIMEOUT_S:.0f} s") from None
        if msg != {"ready": True}:
            raise HelperError(f"math helper process sent {msg!r} instead of ready")

    def call(self, request: dict, deadline_s: float) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        except (BrokenPipeError, OSError) as exc:
            raise HelperError(f"math helper process gone: {exc!r}") from None
        return self._read_message(time.monotonic() + deadline_s, "verification")

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


_lock = threading.Lock()  # guards _idle only; never held while waiting on a helper
_idle: list[_Helper] = []
_owner_pid = os.getpid()


def _acquire() -> _Helper:
    global _owner_pid
    with _lock:
        if _owner_pid != os.getpid():  # a forked child must not share its parent's helpers (or their pipes)
            _idle.clear()
            _owner_pid = os.getpid()
        if _idle:
            return _idle.pop()
    helper = _Helper()
    try:
        helper.wait_ready()
    except BaseException:
        helper.kill()
        raise
    return helper


def run(request: dict, deadline_s: float) -> dict:
    """Send one request to an idle (or new) helper; its answer within ``deadline_s`` seconds of sending.

    Raises :class:`HelperTimeout` past the deadline and :class:`HelperError` when no helper can be started or it
    dies; in both cases that helper is killed. Helper start-up (bounded by 60 s) is not part of the deadline.
    """
    for attempt in range(2):
        helper = _acquire()
        try:
            answer = helper.call(request, deadline_s)
        except HelperError:
            helper.kill()
            if attempt == 0 and helper.proc.returncode is not None:
                continue  # an idle helper that had died (e.g. killed from outside): one retry with a fresh one
            raise
        except BaseException:
            helper.kill()
            raise
        with _lock:
            if _owner_pid == os.getpid():
                _idle.append(helper)
        return answer
    raise AssertionError("unreachable")


@atexit.register
def _shutdown() -> None:
    with _lock:
        helpers, _idle[:] = list(_idle), []
    for h in helpers:
        h.kill()


def helper_main() -> None:
    """Entry point of a helper process: answer judging requests from stdin until EOF."""
    import resource
    import signal

    parent = int(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints (from sympy, math-verify) go to stderr, never into the protocol
    try:
        resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_BYTES, _MEMORY_BYTES))
    except (ValueError, OSError):
        pass

    def watch_parent() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    import math_verify  # noqa: F401 -- import cost before "ready", not inside a caller's deadline

    from .math_verifier import _judge_all

    out.write(b'{"ready": true}\n')
    for line in sys.stdin.buffer:
        try:
            args: dict[str, Any] = json.loads(line)
            answer: dict[str, Any] = {"result": list(_judge_all(**args))}
        except Exception as exc:  # MemoryError included: report it, the parent scores 0 with reason "error"
            answer = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        out.write(json.dumps(answer).encode() + b"\n")
