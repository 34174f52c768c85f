"""Test helpers: picklable toy verifiers for the pool, process scanning, a fake SandboxFusion server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cipo.rewards import RewardResult


class ToyVerifier:
    """``verify(kind, value)``: ``ok`` scores value; ``sleep`` hangs; ``crash`` kills the worker; ``raise`` raises."""

    timeout_s = 1.0

    def verify(self, kind: str, value: float) -> RewardResult:
        if kind == "sleep":
            time.sleep(value)
        elif kind == "crash":
            os._exit(3)
        elif kind == "raise":
            raise RuntimeError("boom")
        elif kind == "spin":
            while True:
                pass
        return RewardResult(float(value), "ok", {"pid": os.getpid()})


def cmdlines_containing(marker: str) -> list[int]:
    """pids (other than ours) whose command line contains ``marker`` -- except the sandbox zygotes (long-lived,
    root, one per verifier process, never running untrusted code) -- and that are not zombies."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in cmd and b"\0--zygote\0" not in cmd and state not in (b"Z", b"X"):
            found.append(int(entry))
    return found


def zygote_pids() -> list[int]:
    """Live sandbox zygotes on the machine."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"\0--zygote\0" in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def wait_gone(check, timeout: float = 2.0) -> list[int]:
    """Poll ``check()`` (returns a list of pids) until empty or timeout; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        left = check()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


class _FakeHandler(BaseHTTPRequestHandler):
    """SandboxFusion's ``POST /run_code``, executing trusted test code with a plain subprocess."""

    requests_seen: list[dict] = []

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):  # noqa: N802 -- http.server API
        if self.path != "/run_code":
            self.send_error(404)
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests_seen.append(body)
        if body.get("code") == "__sandbox_error__":
            out = {"status": "SandboxError", "message": "fake failure", "run_result": None}
        else:
            try:
                p = subprocess.run([sys.executable, "-I", "-c", body["code"]], input=body.get("stdin", ""),
                                   capture_output=True, text=True, timeout=body.get("run_timeout", 5))
                rr = {"status": "Finished", "return_code": p.returncode, "stdout": p.stdout, "stderr": p.stderr,
                      "execution_time": 0.0}
            except subprocess.TimeoutExpired:
                rr = {"status": "TimeLimitExceeded", "return_code": None, "stdout": "", "stderr": "",
                      "execution_time": body.get("run_timeout", 5)}
            out = {"status": "Success" if rr["return_code"] == 0 else "Failed", "message": "", "run_result": rr}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeSandboxFusion:
    """Context manager: a fake SandboxFusion on 127.0.0.1 (an ephemeral port), stopped on exit."""

    def __enter__(self) -> FakeSandboxFusion:
        _FakeHandler.requests_seen = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHandler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    @property
    def requests(self) -> list[dict]:
        return _FakeHandler.requests_seen

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
