"""SandboxFusionBackend against a fake SandboxFusion server on loopback."""

from __future__ import annotations

from cipo.rewards import CodeVerifier, SandboxFusionBackend

from ._helpers import FakeSandboxFusion

ADD = "```python\ndef add(a, b):\n    return a + b\n```"
ADD_IO = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"


def test_assert_and_stdio_pass_and_fail():
    with FakeSandboxFusion() as fake:
        cv = CodeVerifier(backend=SandboxFusionBackend(fake.url, timeout_s=5))
        assert cv.verify(ADD, {"type": "assert", "tests": ["assert add(1, 2) == 3"]}).score == 1.0
        res = cv.verify(ADD, {"type": "assert", "tests": ["assert add(1, 2) == 4"]})
        assert res.score == 0.0 and res.reason == "test_failed"
        io = {"type": "stdio", "cases": [{"input": "1 2\n", "output": "3\n"}, {"input": "2 2", "output": "4"}]}
        assert cv.verify(ADD_IO, io).score == 1.0
        bad = {"type": "stdio", "cases": [{"input": "1 2\n", "output": "3\n"}, {"input": "2 2", "output": "5"}]}
        res = cv.verify(ADD_IO, bad)
        assert res.score == 0.0 and res.reason == "wrong_answer" and res.details["case"] == 1
        req = fake.requests[0]
        assert req["language"] == "python" and "run_timeout" in req and "memory_limit_MB" in req
        # the nonce travels on stdin, never inside the submitted code
        assert req["stdin"].strip() and req["stdin"].strip() not in req["code"]


def test_remote_verdict_cannot_be_faked():
    fake_prog = (
        "```python\nimport os, sys\nprint('ok:1')\nsys.stdout.flush()\n"
        "def add(a, b):\n    return 0\nos._exit(0)\n```"
    )
    with FakeSandboxFusion() as fake:
        cv = CodeVerifier(backend=SandboxFusionBackend(fake.url))
        assert cv.verify(fake_prog, {"type": "assert", "tests": ["assert add(1, 2) == 3"]}).score == 0.0


def test_timeout_and_service_errors():
    with FakeSandboxFusion() as fake:
        backend = SandboxFusionBackend(fake.url, timeout_s=1, retries=0)
        res = backend.run_stdio("while True:\n    pass", [("", "")])
        assert not res.passed and res.reason == "timeout"
        res = backend.run_stdio("__sandbox_error__", [("", "")])
        assert not res.passed and res.reason == "sandbox_error"
    # nothing listening any more: a connection error is a 0, not an exception
    cv = CodeVerifier(backend=SandboxFusionBackend(fake.url, retries=0, request_timeout_s=2))
    res = cv.verify(ADD, {"type": "assert", "tests": ["assert add(1, 2) == 3"]})
    assert res.score == 0.0 and res.reason == "sandbox_error"
