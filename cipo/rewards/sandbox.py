"""Local sandbox for untrusted Python programs (the policy's code responses).

Layers, strongest available first (see docs/REWARDS.md for the threat model):

* a fresh session / process group; a wall-clock deadline that SIGKILLs the whole group;
* rlimits: CPU seconds, address space, file size (also the output cap), open files, process count;
* a stripped environment and ``python -I -S -B`` (no site-packages, no PYTHON* variables);
* when running as root: a dedicated uid per sandbox slot (62000 + slot) so the program can neither touch files
  outside its work directory nor signal the verifier, and RLIMIT_NPROC is counted for this sandbox alone;
* when the kernel allows: new pid, mount and network namespaces -- the program's processes all die when the
  namespace's init dies, /tmp and /dev/shm are private size-capped tmpfs, and there is no network at all;
  otherwise a Python-level socket refusal (weaker) and a kill of every process of the sandbox uid.

Capabilities are detected once per process (:func:`detect_capabilities`). This module is what a run is (its files,
the harness started through its fork server, the verdict); the uid slots and the kill and clean-up of what a
sandbox uid leaves behind are :mod:`cipo.rewards.sandbox_processes`.
"""

from __future__ import annotations

import io
import marshal
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ._harness import outputs_match
from .sandbox_processes import (
    SandboxUnavailable,
    force_rmtree,
    kill_uid,
    pids_of_uid,
    remove_files_of_uid,
    slot_uid,
    sweep_stale_run_dirs,
    wait_pid,
)

_HARNESS_SOURCE = Path(__file__).with_name("_harness.py").read_text(encoding="utf-8")
HARNESS_MARKER = "cipo-sandbox-harness"
_PROBE_PROGRAM = "import bisect, collections, functools, heapq, itertools, json, math, re, string, sys\n"
_PROBE_TESTS = ["assert math.gcd(12, 18) == 6", "assert sorted(collections.Counter('aab').values()) == [1, 2]"]


@dataclass(frozen=True)
class SandboxCapabilities:
    """What this process can use; detected once (root + kernel support decide)."""

    python: str  # interpreter run inside the sandbox (must be executable by the sandbox uid)
    root: bool  # running as root: a dedicated uid per sandbox slot
    namespaces: bool  # new pid + mount namespaces (private /tmp, every leftover process killed)
    netns: bool  # new network namespace; False means the Python-level socket refusal fallback

    def describe(self) -> str:
        net = "netns" if self.netns else "socket-refusal (weak)"
        return f"python={self.python} root={self.root} pid+mount-ns={self.namespaces} network={net}"


@dataclass
class ExecResult:
    """Outcome of running a program against its tests in a backend."""

    passed: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
class _Zygote:
    """Client of the harness's fork server (``_harness.zygote_main``): one per (process, interpreter)."""

    def __init__(self, python: str) -> None:
        self.proc = subprocess.Popen(
            [python, "-I", "-S", "-B", "-c", _HARNESS_SOURCE, "--zygote", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd="/", close_fds=True, start_new_session=True,
        )
        self.lock = threading.Lock()

    def _ask(self, line: str) -> int:
        with self.lock:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        if not answer:
            raise OSError("sandbox zygote is gone")
        return int(answer)

    def spawn(self, cfg_path: str) -> int:
        pid = self._ask(f"run {cfg_path}")
        if pid <= 0:
            raise OSError("sandbox zygote could not fork")
        return pid

    def reap(self, pid: int) -> int:
        return self._ask(f"reap {pid}")

    def alive(self) -> bool:
        return self.proc.poll() is None


_zygotes: dict[tuple[int, str], _Zygote] = {}
_zygote_lock = threading.Lock()


def _zygote(python: str) -> _Zygote | None:
    """The fork server for ``python`` in this process (started on first use); None if it cannot run."""
    key = (os.getpid(), python)
    with _zygote_lock:
        z = _zygotes.get(key)
        if z is not None and z.alive():
            return z
        try:
            z = _Zygote(python)
        except OSError:
            return None
        _zygotes[key] = z
        return z


# ----------------------------------------------------------------------------------------------------------------
_caps_lock = threading.Lock()
_caps_cache: dict[str | None, SandboxCapabilities] = {}


def _interpreter_candidates(preferred: str | None) -> list[str]:
    if preferred:
        return [preferred]
    out: list[str] = []
    for cand in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3",
                 shutil.which("python3") or ""):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK) and cand not in out:
            out.append(os.path.realpath(cand))
    return out


def detect_capabilities(python: str | None = None) -> SandboxCapabilities:
    """Find the strongest sandbox configuration that runs a probe program correctly (cached per process).

    The probe runs through the real pipeline as the real sandbox uid, so an interpreter the uid cannot execute
    (e.g. a venv under /root, mode 0700) is skipped in favour of a world-readable one.
    """
    with _caps_lock:
        if python in _caps_cache:
            return _caps_cache[python]
        root = os.geteuid() == 0
        tried = []
        for interp in _interpreter_candidates(python):
            for ns, net in ((True, True), (False, True), (False, False)):
                caps = SandboxCapabilities(python=interp, root=root, namespaces=ns, netns=net)
                probe = LocalSandbox(timeout_s=10.0, memory_mb=512, capabilities=caps)
                res = probe.run_assert(_PROBE_PROGRAM, _PROBE_TESTS)
                if res.passed:
                    _caps_cache[python] = caps
                    return caps
                tried.append(f"{caps.describe()}: {res.reason} {res.details.get('stderr', '')[-300:]}")
        raise SandboxUnavailable("no sandbox configuration works:\n" + "\n".join(tried))


# ----------------------------------------------------------------------------------------------------------------
class LocalSandbox:
    """Run untrusted Python in the strongest local sandbox available. Picklable (for worker processes): the
    detected capabilities travel with it; the uid slot is per process.

    ``timeout_s`` is the wall-clock budget of one whole verification (all test cases together); CPU time is
    limited to the same number of seconds (rounded up). ``memory_mb`` caps the address space.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        memory_mb: int = 1024,
        *,
        max_output_bytes: int = 8 << 20,
        max_processes: int = 32,
        max_open_files: int = 64,
        tmpfs_mb: int = 128,
        python: str | None = None,
        capabilities: SandboxCapabilities | None = None,
        use_zygote: bool = True,
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.max_output_bytes = int(max_output_bytes)
        self.max_processes = int(max_processes)
        self.max_open_files = int(max_open_files)
        self.tmpfs_mb = int(tmpfs_mb)
        self.python = python
        self._caps = capabilities
        self.use_zygote = bool(use_zygote)

    # -- public ------------------------------------------------------------------------------------------------
    @property
    def capabilities(self) -> SandboxCapabilities:
        if self._caps is None:
            self._caps = detect_capabilities(self.python)
        return self._caps

    @property
    def uid(self) -> int | None:
        """The uid the programs of this process run as (None when not root)."""
        return slot_uid() if self.capabilities.root else None

    def run_assert(self, program: str, tests: Sequence[str]) -> ExecResult:
        """Run ``program`` then each test statement in the same namespace; pass iff all statements succeed."""
        if not tests:
            return ExecResult(False, "no_tests", {})
        nonce = secrets.token_hex(16)
        runs = [{"stdin": "/dev/null", "stdout": "out0", "stderr": "err0", "verdict": "verdict"}]
        cfg = {"mode": "assert", "program": program, "tests": [str(t) for t in tests], "nonce": nonce}
        res, base = self._execute(cfg, runs, inputs=None)
        try:
            if res is not None:
                return res
            statuses = self._statuses(base)
            details = self._collect(base, runs[0])
            verdict = self._read_head(os.path.join(base, "verdict"), 4096)
            if verdict == f"{nonce}:{len(tests)}\n".encode():
                return ExecResult(True, "passed", details)
            return ExecResult(False, self._failure_reason(statuses, details), details)
        finally:
            self._cleanup(base)

    def run_stdio(self, program: str, cases: Sequence[tuple[str, str]]) -> ExecResult:
        """Run ``program`` once per ``(stdin, expected_stdout)`` case; pass iff every output matches."""
        if not cases:
            return ExecResult(False, "no_tests", {})
        runs = [{"stdin": f"in{i}", "stdout": f"out{i}", "stderr": f"err{i}"} for i in range(len(cases))]
        cfg = {"mode": "stdio", "program": program, "expected": [str(c[1]) for c in cases]}
        res, base = self._execute(cfg, runs, inputs=[str(c[0]) for c in cases])
        try:
            if res is not None:
                return res
            statuses = self._statuses(base)
            for i, (_, expected) in enumerate(cases):
                st = statuses.get(i)
                details = self._collect(base, runs[i])
                details["case"] = i
                if st is None or not (os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0):
                    return ExecResult(False, self._failure_reason(statuses, details), details)
                out_path = os.path.join(base, runs[i]["stdout"])
                if os.path.getsize(out_path) >= self.max_output_bytes:
                    return ExecResult(False, "output_limit", details)
                actual = self._read_head(out_path, self.max_output_bytes).decode("utf-8", "replace")
                if not outputs_match(actual, str(expected)):  # the parent re-checks; H1's check is only early-stop
                    return ExecResult(False, "wrong_answer", details)
            return ExecResult(True, "passed", {"cases": len(cases)})
        finally:
            self._cleanup(base)

    # -- internals ---------------------------------------------------------------------------------------------
    def _execute(self, cfg: dict, runs: list[dict], inputs: list[str] | None) -> tuple[ExecResult | None, str]:
        """Write the run files, start H0, enforce the wall clock. Returns (early failure or None, base dir)."""
        sweep_stale_run_dirs()
        # 0700: the sandbox uid can never reach it by name. Our pid in the name lets a later process remove it if
        # we are SIGKILLed mid-run.
        base = tempfile.mkdtemp(prefix=f"cipo-sbx-{os.getpid()}-")
        try:
            return self._execute_in(base, cfg, runs, inputs), base
        except BaseException:
            self._cleanup(base)  # the caller only cleans up what it got back
            raise

    def _execute_in(self, base: str, cfg: dict, runs: list[dict], inputs: list[str] | None) -> ExecResult | None:
        caps = self.capabilities
        start = time.monotonic()
        uid = self.uid
        workdir = os.path.join(base, "work")
        os.mkdir(workdir, 0o700)
        if uid is not None:
            os.chown(workdir, uid, uid)
        for run in runs:
            for key in ("stdout", "stderr", "verdict"):
                if key in run:
                    open(os.path.join(base, run[key]), "wb").close()
        if inputs is not None:
            for run, text in zip(runs, inputs):
                with open(os.path.join(base, run["stdin"]), "w", encoding="utf-8") as f:
                    f.write(text)
        open(os.path.join(base, "status"), "wb").close()
        cpu_s = max(1, math.ceil(self.timeout_s))
        cfg.update(
            base=base, workdir=workdir, runs=runs, status="status", ppid=os.getpid(),
            uid=uid, gid=uid, namespaces=caps.namespaces, netns=caps.netns, tmpfs_mb=self.tmpfs_mb,
            cpu_s=cpu_s, as_bytes=self.memory_mb << 20, fsize_bytes=self.max_output_bytes,
            nofile=self.max_open_files, nproc=self._nproc_limit(uid),
        )
        cfg_path = os.path.join(base, "config")
        fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "wb") as f:
            marshal.dump(cfg, f)
        cfg.clear()  # drop our copy of the nonce as early as possible
        open(os.path.join(base, "harness.err"), "wb").close()
        pid, popen, zygote = self._start_h0(caps, cfg_path)
        if pid is None:
            return ExecResult(False, "sandbox_error", {"error": "could not start the sandbox harness"})
        timed_out = not wait_pid(pid, popen, max(0.0, self.timeout_s - (time.monotonic() - start)))
        if timed_out:
            try:
                os.killpg(pid, signal.SIGKILL)  # H0's group: H0, H1 (pid namespace init) and U
            except (ProcessLookupError, PermissionError):
                pass
        rc = self._reap_h0(pid, popen, zygote)
        # After a normal exit under a pid namespace the namespace is already empty (its init killed everything
        # and then exited); otherwise make sure, by group and by uid.
        if timed_out or rc != 0 or not caps.namespaces:
            self._kill_all(pid, uid)
        wall = time.monotonic() - start
        if timed_out:
            return ExecResult(False, "timeout", {"wall_s": wall, "timeout_s": self.timeout_s})
        if rc != 0:
            herr_text = self._read_head(os.path.join(base, "harness.err"), 2000).decode("utf-8", "replace")
            return ExecResult(False, "sandbox_error", {"harness_rc": rc, "stderr": herr_text})
        return None

    def _start_h0(self, caps: SandboxCapabilities, cfg_path: str) -> tuple[int | None, Any, _Zygote | None]:
        """Start H0: forked by the zygote when it runs (fast), else a fresh interpreter."""
        if self.use_zygote:
            z = _zygote(caps.python)
            if z is not None:
                try:
                    return z.spawn(cfg_path), None, z
                except (OSError, ValueError):
                    pass  # zygote died: fall through to a direct start (and a new zygote next time)
        try:
            proc = subprocess.Popen(
                [caps.python, "-I", "-S", "-B", "-c", _HARNESS_SOURCE, cfg_path],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd=os.path.dirname(cfg_path),
                close_fds=True, start_new_session=True,
            )
        except OSError:
            return None, None, None
        return proc.pid, proc, None

    @staticmethod
    def _reap_h0(pid: int, popen: subprocess.Popen | None, zygote: _Zygote | None) -> int:
        """H0's exit code (its own status, or 1xx harness codes); -1 if unknown."""
        if popen is not None:
            return popen.wait()
        try:
            status = zygote.reap(pid) if zygote is not None else -1
        except (OSError, ValueError):
            status = -1
        if status < 0:
            return -1
        return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)

    def _nproc_limit(self, uid: int | None) -> int:
        if uid is not None:
            return self.max_processes  # a dedicated uid: the count starts at zero
        # Same uid as the verifier: RLIMIT_NPROC counts all its processes, so allow the current ones plus ours.
        return len(pids_of_uid(os.getuid())) + self.max_processes

    def _kill_all(self, pid: int, uid: int | None) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if uid is not None:
            # Daemons that called setsid() escape the group; under a pid namespace they die with its init (the
            # kernel does it), without one we kill by uid. Either way the uid has no live process left after this.
            kill_uid(uid, self.capabilities.python)
            if not self.capabilities.namespaces:
                remove_files_of_uid(uid)  # no private /tmp: what it wrote to shared world-writable dirs goes


    @staticmethod
    def _read_head(path: str, limit: int) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read(limit)
        except OSError:
            return b""

    @staticmethod
    def _read_tail(path: str, limit: int) -> bytes:
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - limit))
                return f.read(limit)
        except OSError:
            return b""

    def _collect(self, base: str, run: dict) -> dict[str, Any]:
        return {
            "stdout": self._read_head(os.path.join(base, run["stdout"]), 1000).decode("utf-8", "replace"),
            "stderr": self._read_tail(os.path.join(base, run["stderr"]), 1000).decode("utf-8", "replace"),
        }

    @staticmethod
    def _statuses(base: str) -> dict[int, int]:
        out: dict[int, int] = {}
        try:
            with open(os.path.join(base, "status"), "rb") as f:
                buf = io.BytesIO(f.read(1 << 20))
        except OSError:
            return out
        while True:
            try:
                i, status, _ok = marshal.load(buf)
            except (EOFError, ValueError, TypeError):
                return out
            out[int(i)] = int(status)

    @staticmethod
    def _failure_reason(statuses: dict[int, int], details: dict[str, Any]) -> str:
        st = statuses.get(details.get("case", 0))
        if st is None or st < 0:
            return "no_result"
        if os.WIFSIGNALED(st):
            sig = os.WTERMSIG(st)
            details["signal"] = sig
            return {signal.SIGXCPU: "cpu_time_limit", signal.SIGXFSZ: "output_limit"}.get(sig, "killed")
        code = os.WEXITSTATUS(st)
        details["exit_code"] = code
        err = details.get("stderr", "")
        if code == 0:
            return "no_verdict"  # exited 0 without the harness's verdict: early exit or a faked success
        if "cipo-sandbox: test" in err:
            return "test_failed"
        if "MemoryError" in err:
            return "memory_limit"
        if "File too large" in err:  # Python ignores SIGXFSZ: the write fails with EFBIG at the output cap
            return "output_limit"
        return "runtime_error"

    @staticmethod
    def _cleanup(base: str) -> None:
        force_rmtree(base)

    def __repr__(self) -> str:
        return f"LocalSandbox(timeout_s={self.timeout_s}, memory_mb={self.memory_mb})"
