"""Code verification: extract the program from a response and run it against tests in a sandbox.

``tests`` formats (a dict, or its JSON string):

* ``{"type": "assert", "tests": ["assert f(1) == 2", ...]}`` -- the program, then each statement, in one namespace;
* ``{"type": "stdio", "cases": [{"input": "1 2\\n", "output": "3\\n"}, ...]}`` -- one run per case;
* ``{"inputs": [...], "outputs": [...]}`` (APPS/TACO style) is read as ``stdio``.

Score 1.0 only when every test passes; anything else (no code, syntax error, wrong answer, crash, timeout, any
limit, a sandbox failure) is 0.0 with a reason.
"""

from __future__ import annotations

import json
import re
from typing import Any, Protocol, Sequence

from .sandbox import ExecResult, LocalSandbox
from .types import RewardResult

_FENCE_RE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([\w+#.-]*)[^\n]*\n", re.MULTILINE)
_PY_TAGS = {"", "python", "py", "python3", "py3"}
MAX_PROGRAM_CHARS = 200_000


class CodeBackend(Protocol):
    """Where programs run: :class:`~cipo.rewards.sandbox.LocalSandbox` or a remote service."""

    def run_assert(self, program: str, tests: Sequence[str]) -> ExecResult: ...

    def run_stdio(self, program: str, cases: Sequence[tuple[str, str]]) -> ExecResult: ...


def extract_code(response: str) -> str | None:
    """The program in ``response``: the last fenced block tagged python (or untagged); the last one wins.

    An unclosed final fence (a response cut at the length limit) runs to the end of the text. Blocks tagged with
    another language (``bash``, ``text``...) are skipped. Without any fence, the whole response is used if it is
    valid Python, else None.
    """
    if not isinstance(response, str):
        return None
    blocks: list[str] = []
    pos = 0
    while True:
        m = _FENCE_RE.search(response, pos)
        if m is None:
            break
        fence, tag = m.group(1), m.group(2).lower()
        close = re.compile(r"^[ \t]*" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}[ \t]*$", re.MULTILINE)
        end = close.search(response, m.end())
        body = response[m.end() : end.start() if end else len(response)]
        if tag in _PY_TAGS:
            blocks.append(body)
        if end is None:
            break
        pos = end.end()
    if blocks:
        return blocks[-1]
    import ast

    try:
        ast.parse(response)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    return response if response.strip() else None


def parse_tests(tests: Any) -> tuple[str, list]:
    """Normalise a tests spec to ``("assert", [statements])`` or ``("stdio", [(input, output)])``."""
    if isinstance(tests, (str, bytes)):
        tests = json.loads(tests)
    if not isinstance(tests, dict):
        raise ValueError(f"tests must be a dict or its JSON, got {type(tests).__name__}")
    kind = tests.get("type")
    if kind is None and "inputs" in tests and "outputs" in tests:
        kind = "stdio"
        tests = {"cases": [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]}
    if kind == "assert":
        stmts = tests.get("tests")
        if not isinstance(stmts, (list, tuple)) or not all(isinstance(s, str) for s in stmts):
            raise ValueError("assert tests must be a list of strings")
        return "assert", list(stmts)
    if kind == "stdio":
        cases = []
        for c in tests.get("cases", []):
            inp, out = c["input"], c["output"]
            inp = "\n".join(map(str, inp)) + "\n" if isinstance(inp, list) else str(inp)
            out = "\n".join(map(str, out)) if isinstance(out, list) else str(out)
            cases.append((inp, out))
        return "stdio", cases
    raise ValueError(f"unknown tests type {kind!r}")


class CodeVerifier:
    """Score 1.0 when the response's program passes every test, else 0.0. Picklable.

    Args:
        timeout_s: wall-clock budget for one verification (all its test cases); also the CPU-seconds limit.
        memory_mb: address-space limit of the program.
        backend: where to run (default: a :class:`LocalSandbox` with these limits).
    """

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 1024, backend: CodeBackend | None = None,
                 **sandbox_kwargs: Any) -> None:
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.backend: CodeBackend = backend or LocalSandbox(timeout_s, memory_mb, **sandbox_kwargs)

    def verify(self, response: str, tests: Any) -> RewardResult:
        """Verify one response. Never raises (a backend failure is a 0 with reason ``sandbox_error``)."""
        try:
            kind, spec = parse_tests(tests)
        except (ValueError, KeyError, TypeError) as exc:
            return RewardResult(0.0, "bad_tests", {"error": str(exc)[:200]})
        program = extract_code(response)
        if program is None:
            return RewardResult(0.0, "no_code", {})
        if len(program) > MAX_PROGRAM_CHARS:
            return RewardResult(0.0, "program_too_long", {"chars": len(program)})
        try:
            res = self.backend.run_assert(program, spec) if kind == "assert" else self.backend.run_stdio(program, spec)
        except Exception as exc:
            return RewardResult(0.0, "sandbox_error", {"error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        details = dict(res.details)
        details["format"] = kind
        return RewardResult(1.0 if res.passed else 0.0, "passed" if res.passed else res.reason, details)

    def __repr__(self) -> str:
        return f"CodeVerifier(timeout_s={self.timeout_s}, memory_mb={self.memory_mb}, backend={self.backend!r})"
