"""Optional backend: a SandboxFusion service (``POST {url}/run_code``), standard library HTTP only.

Request: ``{"code", "language": "python", "run_timeout", "memory_limit_MB", "stdin"}``. Response:
``{"status": "Success"|"Failed"|"SandboxError", "message", "run_result": {"status", "return_code", "stdout",
"stderr", "execution_time"}}``.

Isolation is the service's. What we add: for ``assert`` tests the submitted code is our harness (see
``_harness._remote_assert_main``) and the success verdict is a nonce sent on stdin, read before the program runs and
never part of the submitted source; the program's own prints and exit status are not trusted.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

from ._harness import outputs_match
from .sandbox import _HARNESS_SOURCE, ExecResult


class SandboxFusionBackend:
    """Run programs on a SandboxFusion server. Picklable; one HTTP request per run (per stdio case).

    Args:
        url: base URL of the service, e.g. ``http://127.0.0.1:8080``.
        timeout_s: ``run_timeout`` of each request (the service enforces it).
        memory_mb: ``memory_limit_MB`` of each request.
        request_timeout_s: HTTP timeout (default ``timeout_s + 10``).
        retries: extra attempts on connection errors and ``SandboxError`` answers.
    """

    def __init__(self, url: str, timeout_s: float = 5.0, memory_mb: int = 1024,
                 request_timeout_s: float | None = None, retries: int = 1) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.request_timeout_s = float(request_timeout_s) if request_timeout_s else self.timeout_s + 10.0
        self.retries = int(retries)

    def _post(self, code: str, stdin: str) -> dict[str, Any]:
        body = json.dumps({
            "code": code, "language": "python", "run_timeout": self.timeout_s, "compile_timeout": self.timeout_s,
            "memory_limit_MB": self.memory_mb, "stdin": stdin,
        }).encode()
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url + "/run_code", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.request_timeout_s) as resp:
                    out = json.loads(resp.read(16 << 20))
                if out.get("status") != "SandboxError":
                    return out
                last = RuntimeError(f"SandboxError: {str(out.get('message'))[:200]}")
            except (urllib.error.URLError, OSError, ValueError) as exc:
                last = exc
            if attempt < self.retries:
                time.sleep(0.2 * (attempt + 1))
        raise ConnectionError(f"SandboxFusion request failed: {last!r}")

    @staticmethod
    def _run_result(resp: dict[str, Any]) -> dict[str, Any]:
        rr = resp.get("run_result") or {}
        return {
            "status": rr.get("status"), "return_code": rr.get("return_code"),
            "stdout": str(rr.get("stdout") or ""), "stderr": str(rr.get("stderr") or ""),
        }

    def run_assert(self, program: str, tests: Sequence[str]) -> ExecResult:
        if not tests:
            return ExecResult(False, "no_tests", {})
        nonce = secrets.token_hex(16)
        payload = base64.b64encode(json.dumps({"program": program, "tests": list(tests)}).encode()).decode()
        code = f"_CIPO_REMOTE_PAYLOAD = {payload!r}\n{_HARNESS_SOURCE}\n_remote_assert_main(_CIPO_REMOTE_PAYLOAD)\n"
        try:
            rr = self._run_result(self._post(code, nonce + "\n"))
        except ConnectionError as exc:
            return ExecResult(False, "sandbox_error", {"error": str(exc)[:300]})
        details = {"stdout": rr["stdout"][:1000], "stderr": rr["stderr"][-1000:], "remote_status": rr["status"]}
        if rr["return_code"] == 0 and rr["stdout"].endswith(f"{nonce}:{len(tests)}\n"):
            return ExecResult(True, "passed", details)
        if rr["status"] == "TimeLimitExceeded":
            return ExecResult(False, "timeout", details)
        return ExecResult(False, "test_failed" if "cipo-sandbox: test" in rr["stderr"] else "runtime_error", details)

    def run_stdio(self, program: str, cases: Sequence[tuple[str, str]]) -> ExecResult:
        if not cases:
            return ExecResult(False, "no_tests", {})
        for i, (inp, expected) in enumerate(cases):
            try:
                rr = self._run_result(self._post(program, str(inp)))
            except ConnectionError as exc:
                return ExecResult(False, "sandbox_error", {"error": str(exc)[:300], "case": i})
            details = {"case": i, "stdout": rr["stdout"][:1000], "stderr": rr["stderr"][-1000:],
                       "remote_status": rr["status"]}
            if rr["status"] == "TimeLimitExceeded":
                return ExecResult(False, "timeout", details)
            if rr["return_code"] != 0:
                return ExecResult(False, "runtime_error", details)
            if not outputs_match(rr["stdout"], str(expected)):
                return ExecResult(False, "wrong_answer", details)
        return ExecResult(True, "passed", {"cases": len(cases)})

    def __repr__(self) -> str:
        return f"SandboxFusionBackend(url={self.url!r}, timeout_s={self.timeout_s}, memory_mb={self.memory_mb})"
