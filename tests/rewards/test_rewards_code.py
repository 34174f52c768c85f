"""CodeVerifier + LocalSandbox: correct programs pass in both formats; hostile programs score 0, return within
timeout + 1 s, leave no process behind and leave files outside their work directory untouched."""

from __future__ import annotations

import glob
import os
import socket
import tempfile
import textwrap
import threading
import time

import pytest

from cipo.rewards import CodeVerifier, LocalSandbox, SandboxCapabilities, detect_capabilities, extract_code
from cipo.rewards.sandbox import HARNESS_MARKER
from cipo.rewards.sandbox_processes import pids_of_uid

from ._helpers import cmdlines_containing, wait_gone

TIMEOUT = 1.5
ROOT = os.geteuid() == 0


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{textwrap.dedent(code).strip()}\n```\nDone."


def assert_tests(*stmts: str) -> dict:
    return {"type": "assert", "tests": list(stmts)}


def stdio(*pairs: tuple[str, str]) -> dict:
    return {"type": "stdio", "cases": [{"input": i, "output": o} for i, o in pairs]}


@pytest.fixture(scope="module")
def caps() -> SandboxCapabilities:
    return detect_capabilities()


@pytest.fixture(scope="module")
def cv(caps) -> CodeVerifier:
    """For programs that should pass: a generous budget, so a loaded machine cannot turn a pass into a timeout."""
    return CodeVerifier(timeout_s=10.0, memory_mb=256)


@pytest.fixture(scope="module")
def cv_short(caps) -> CodeVerifier:
    """For hostile programs: a short budget, and the check that each returns within it + 1 s."""
    return CodeVerifier(timeout_s=TIMEOUT, memory_mb=256)


def test_capabilities_reported(caps):
    print("sandbox:", caps.describe())
    assert caps.python and os.path.isabs(caps.python)
    if ROOT:
        assert caps.root


# ------------------------------------------------------------------------------------------------- correct code
ADD = """
def add(a, b):
    return a + b
"""
ADD_STDIO = """
import sys
data = sys.stdin.read().split()
print(int(data[0]) + int(data[1]))
"""


def test_correct_assert_program_passes(cv):
    res = cv.verify(fenced(ADD), assert_tests("assert add(1, 2) == 3", "assert add(-1, 1) == 0", "x = add(2, 2)",
                                              "assert x == 4"))
    assert res.score == 1.0, res
    assert res.reason == "passed"


def test_correct_stdio_program_passes(cv):
    res = cv.verify(fenced(ADD_STDIO), stdio(("1 2\n", "3\n"), ("10 20", "30"), ("-5 5\n", "0  \n\n")))
    assert res.score == 1.0, res


def test_stdio_json_string_and_apps_format(cv):
    import json

    spec = json.dumps({"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]})
    assert cv.verify(fenced(ADD_STDIO), spec).score == 1.0


def test_partially_correct_scores_zero(cv):
    buggy = "def add(a, b):\n    return a + b if a >= 0 else a - b\n"
    res = cv.verify(fenced(buggy), assert_tests("assert add(1, 2) == 3", "assert add(-1, 1) == 0"))
    assert res.score == 0.0 and res.reason == "test_failed", res
    buggy_io = "a, b = map(int, input().split())\nprint(a + b if a >= 0 else 0)\n"
    res = cv.verify(fenced(buggy_io), stdio(("1 2", "3"), ("-1 5", "4")))
    assert res.score == 0.0 and res.reason == "wrong_answer", res
    assert res.details["case"] == 1


def test_common_failures_have_reasons(cv):
    assert cv.verify("no code here, sorry", assert_tests("assert True")).reason == "no_code"
    assert cv.verify(fenced("def f(:\n  pass"), assert_tests("assert True")).reason == "runtime_error"
    assert cv.verify(fenced(ADD), assert_tests()).reason == "no_tests"
    assert cv.verify(fenced(ADD), {"type": "nope"}).reason == "bad_tests"
    res = cv.verify(fenced("raise ValueError('x')"), stdio(("", "")))
    assert res.score == 0.0 and res.reason == "runtime_error"


def test_judge_idioms_work(cv):
    """``exit()`` (site's builtin, absent under -S) and a solution run in a thread for a bigger stack."""
    prog = """
    import sys, threading
    def main():
        n = int(sys.stdin.readline())
        sys.setrecursionlimit(10000)
        f = lambda k: 0 if k == 0 else 1 + f(k - 1)
        print(f(n))
    threading.stack_size(64 * 1024 * 1024)
    threading.Thread(target=main).start()
    """
    assert cv.verify(fenced(prog), stdio(("3000", "3000"))).score == 1.0
    early = "print(int(input()) * 2)\nexit()\nprint('never')"
    assert cv.verify(fenced(early), stdio(("21", "42"))).score == 1.0


def test_stdlib_imports_work_in_the_sandbox(cv):
    prog = """
    import bisect, collections, functools, heapq, itertools, math, re, string, fractions, decimal
    def f():
        return math.comb(5, 2) + len(collections.Counter("aab"))
    """
    assert cv.verify(fenced(prog), assert_tests("assert f() == 12")).score == 1.0


@pytest.mark.parametrize(
    "response,expected",
    [
        ("```python\nx = 1\n```\ntext\n```python\nx = 2\n```", "x = 2\n"),
        ("```py\na = 1\n```\n```bash\nls -la\n```", "a = 1\n"),
        ("```\nuntagged = 1\n```", "untagged = 1\n"),
        ("```python\ncut = 1\n", "cut = 1\n"),  # unclosed final fence (length-limited response)
        ("def f():\n    return 1\n", "def f():\n    return 1\n"),  # no fence, valid python
        ("I think the answer is yes.", None),
        ("````python\nouter = '```'\n````", "outer = '```'\n"),
    ],
)
def test_extract_code(response, expected):
    assert extract_code(response) == expected


def test_verify_off_the_main_thread(cv):
    out = []
    t = threading.Thread(target=lambda: out.append(cv.verify(fenced(ADD), assert_tests("assert add(1, 1) == 2"))))
    t.start()
    t.join(30)
    assert out and out[0].score == 1.0


# ----------------------------------------------------------------------------------------------- hostile programs
def _hostile(sentinel_dir: str, port: int, marker: str) -> dict[str, tuple[str, dict]]:
    """Hostile programs keyed by name: (program, tests). Each test would pass if the attack worked."""
    sentinel = os.path.join(sentinel_dir, "sentinel.txt")
    pid = os.getpid()
    ok1 = assert_tests("assert f() == 1")
    return {
        "infinite_loop": ("def f():\n    return 1\nwhile True:\n    pass", ok1),
        "fork_bomb": ("import os\ndef f():\n    return 1\nwhile True:\n    try:\n        os.fork()\n"
                      "    except OSError:\n        pass", ok1),
        "memory_hog": ("blob = bytearray(8 * 1024**3)\ndef f():\n    return 1", ok1),
        "memory_hog_gradual": ("chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024**2))\n"
                               "def f():\n    return 1", ok1),
        "gigabyte_output": ("import sys\nline = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(line)\n"
                            "def f():\n    return 1", ok1),
        "gigabyte_output_stdio": ("import os\nline = b'3' * (1 << 20)\nfor _ in range(1024):\n    os.write(1, line)",
                                  stdio(("1 2", "3"))),
        "write_outside_workdir": (
            f"import os, shutil\n"
            f"for act in (lambda: open({sentinel!r}, 'w').write('pwned'), lambda: os.remove({sentinel!r}),\n"
            f"            lambda: os.rename({sentinel!r}, {sentinel!r} + '.moved'),\n"
            f"            lambda: open(os.path.join({sentinel_dir!r}, 'new.txt'), 'w').write('x'),\n"
            f"            lambda: shutil.rmtree({sentinel_dir!r}),\n"
            f"            lambda: open('/tmp/{marker}.txt', 'w').write('x'),\n"
            f"            lambda: os.chmod({sentinel!r}, 0o777)):\n"
            f"    try:\n        act()\n    except OSError:\n        pass\n"
            f"def f():\n    return 2", ok1),
        "network_connection": (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                               f"s.sendall(b'leak')\ndef f():\n    return 1", ok1),
        "kill_parent_and_group": (
            f"import os, signal\n"
            f"for act in (lambda: os.kill(os.getppid(), signal.SIGKILL), lambda: os.killpg(0, signal.SIGKILL),\n"
            f"            lambda: os.killpg(os.getpgid(os.getppid()), signal.SIGKILL),\n"
            f"            lambda: os.kill({pid}, signal.SIGKILL), lambda: os.kill(-1, signal.SIGKILL)):\n"
            f"    try:\n        act()\n    except OSError:\n        pass\n"
            f"def f():\n    return 2", ok1),
        "raise_rlimits": (
            "import resource, sys\nraised = []\n"
            "for name in ('RLIMIT_CPU', 'RLIMIT_AS', 'RLIMIT_NPROC', 'RLIMIT_NOFILE', 'RLIMIT_FSIZE'):\n"
            "    r = getattr(resource, name)\n"
            "    try:\n        resource.setrlimit(r, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
            "        raised.append(name)\n    except (ValueError, OSError):\n        pass\n"
            "print('raised:', raised, file=sys.stderr, flush=True)\n"
            "blob = bytearray(2 * 1024**3)\ndef f():\n    return 1", ok1),
        "os_exit_before_tests": ("import os\ndef f():\n    return 2\nos._exit(0)", ok1),
        "sys_exit_before_tests": ("import sys\ndef f():\n    return 2\nsys.exit(0)", ok1),
        "read_stdin_forever": ("import sys\nwhile True:\n    sys.stdin.read()\ndef f():\n    return 1", ok1),
        "read_stdin_forever_stdio": ("import sys\nwhile True:\n    sys.stdin.read()", stdio(("1 2", "3"))),
        "daemon_outlives_run": (
            f"import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n    os._exit(0)\n"
            f"def f():\n    return 2", ok1),
        "python_daemon_outlives_run": (
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        time.sleep(60)\n    os._exit(0)\ndef f():\n    return 2", ok1),
        "monkeypatch_fake_verdicts": (
            "import os, sys, builtins\n"
            "print('ALL TESTS PASSED'); print('ok'); sys.stdout.flush()\n"
            "for fd in range(0, 64):\n    try:\n        os.write(fd, b'00000000000000000000000000000000:1\\n')\n"
            "    except OSError:\n        pass\n"
            "def f():\n    return 2", ok1),
        "monkeypatch_builtins_and_os": (
            "import os, sys, builtins, atexit\n"
            "builtins.exec = lambda *a, **k: None\nbuiltins.eval = lambda *a, **k: (1, 1)\n"
            "builtins.compile = lambda *a, **k: None\nbuiltins.AssertionError = Exception\n"
            "os._exit = lambda code=0: None\nos.write = lambda fd, data: len(data)\nsys.exit = lambda *a: None\n"
            "atexit.register(lambda: print('PASS'))\n"
            "import __main__\nfor name in dir(__main__):\n"
            "    if callable(getattr(__main__, name, None)) and not name.startswith('__'):\n"
            "        try:\n            setattr(__main__, name, lambda *a, **k: None)\n"
            "        except Exception:\n            pass\n"
            "def f():\n    return 2", ok1),
        "monkeypatch_eq_always_true": (
            "class Anything:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
            "def f():\n    return Anything()", ok1),
        "monkeypatch_eq_nested": (
            "class Anything:\n    def __eq__(self, other):\n        return True\n"
            "def f():\n    return [Anything()]", assert_tests("assert f() == [1]")),
        "monkeypatch_settrace": (
            "import sys\ndef tracer(frame, event, arg):\n    return tracer\nsys.settrace(tracer)\n"
            "def f():\n    sys.settrace(tracer)\n    return 2", ok1),
    }


HOSTILE_NAMES = list(_hostile("/x", 1, "m").keys())


@pytest.fixture()
def listener():
    """A TCP server on loopback that records whether anyone connected."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.01)
    yield srv
    srv.close()


def _accepted_any(srv: socket.socket) -> bool:
    try:
        conn, _ = srv.accept()
    except (socket.timeout, BlockingIOError, OSError):
        return False
    conn.close()
    return True


def _run_hostile(name: str, verifier: CodeVerifier, tmp_path, listener):
    sentinel_dir = tmp_path / "outside"
    sentinel_dir.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(sentinel_dir, 0o755)  # visible to the sandbox uid, writable only by us
    sentinel = sentinel_dir / "sentinel.txt"
    sentinel.write_text("precious")
    os.chmod(sentinel, 0o644)
    marker = f"{time.time_ns() % 10**9}.{os.getpid()}"
    program, tests = _hostile(str(sentinel_dir), listener.getsockname()[1], marker)[name]
    sbx_dirs_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "cipo-sbx-*")))

    t0 = time.monotonic()
    res = verifier.verify(fenced(program), tests)
    elapsed = time.monotonic() - t0

    assert res.score == 0.0, (name, res)
    assert elapsed < verifier.timeout_s + 1.0, (name, elapsed, res)
    # no process behind: harness processes, the marker daemon, anything of the sandbox uid
    assert wait_gone(lambda: cmdlines_containing(marker), 0.5) == [], name
    assert wait_gone(lambda: cmdlines_containing(HARNESS_MARKER), 0.5) == [], name
    uid = verifier.backend.uid
    if uid is not None:
        assert wait_gone(lambda: pids_of_uid(uid), 0.5) == [], name
    # files outside the work dir untouched; our own work files removed
    assert sentinel.read_text() == "precious" and sorted(os.listdir(sentinel_dir)) == ["sentinel.txt"], name
    assert (os.stat(sentinel).st_mode & 0o777) == 0o644
    assert not os.path.exists(f"/tmp/{marker}.txt"), name
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "cipo-sbx-*"))) <= sbx_dirs_before, name
    assert not _accepted_any(listener), name
    return res


@pytest.mark.skipif(not ROOT, reason="the full hostile guarantees need root (dedicated uid); CI runs as root")
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_program(name, cv_short, tmp_path, listener):
    res = _run_hostile(name, cv_short, tmp_path, listener)
    if name == "raise_rlimits" and res.reason != "timeout":
        assert "raised: []" in res.details.get("stderr", ""), res


# Without pid/mount/net namespaces (older kernels, containers that forbid unshare): the fallback layers must still
# hold for all of them (files the uid wrote to world-writable dirs such as /tmp are deleted after the run).
FALLBACK_NAMES = HOSTILE_NAMES


@pytest.mark.skipif(not ROOT, reason="the fallback still relies on a dedicated uid; CI runs as root")
@pytest.mark.parametrize("name", FALLBACK_NAMES)
def test_hostile_program_without_namespaces(name, caps, tmp_path, listener):
    weak = SandboxCapabilities(python=caps.python, root=caps.root, namespaces=False, netns=False)
    verifier = CodeVerifier(timeout_s=TIMEOUT, memory_mb=256, backend=LocalSandbox(TIMEOUT, 256, capabilities=weak))
    _run_hostile(name, verifier, tmp_path, listener)


def test_correct_program_passes_without_namespaces(caps):
    weak = SandboxCapabilities(python=caps.python, root=caps.root, namespaces=False, netns=False)
    verifier = CodeVerifier(backend=LocalSandbox(5.0, 256, capabilities=weak))
    assert verifier.verify(fenced(ADD), assert_tests("assert add(2, 3) == 5")).score == 1.0
    assert verifier.verify(fenced(ADD_STDIO), stdio(("2 3", "5"))).score == 1.0


def test_memory_limit_is_enforced(caps):
    verifier = CodeVerifier(timeout_s=10.0, memory_mb=256)
    res = verifier.verify(fenced("blob = bytearray(1024**3)\ndef f():\n    return 1"), assert_tests("assert f() == 1"))
    assert res.score == 0.0 and res.reason == "memory_limit", res
    small = fenced("blob = bytearray(64 * 1024**2)\ndef f():\n    return 1")
    res = verifier.verify(small, assert_tests("assert f() == 1"))
    assert res.score == 1.0, res  # well under the limit


def test_output_is_capped(caps):
    sbx = LocalSandbox(10.0, 256, max_output_bytes=1 << 20)
    res = sbx.run_stdio("import sys\nsys.stdout.write('x' * (4 << 20))", [("", "x")])
    assert not res.passed and res.reason in ("output_limit", "runtime_error"), res


def test_many_cases_share_the_budget(cv_short):
    """timeout_s bounds the whole verification, however many cases there are."""
    slow = "import time\ntime.sleep(0.4)\nprint(input())"
    t0 = time.monotonic()
    res = cv_short.verify(fenced(slow), stdio(*[(str(i), str(i)) for i in range(10)]))
    assert res.score == 0.0 and res.reason == "timeout"
    assert time.monotonic() - t0 < TIMEOUT + 1.0


def test_direct_start_without_zygote(caps):
    """The fallback path (a fresh interpreter per verification) gives the same verdicts."""
    assert LocalSandbox(10.0, 256, use_zygote=False).run_assert(ADD, ["assert add(1, 2) == 3"]).passed
    sbx = LocalSandbox(TIMEOUT, 256, use_zygote=False)
    t0 = time.monotonic()
    res = sbx.run_assert("while True:\n    pass", ["assert True"])
    assert not res.passed and res.reason == "timeout" and time.monotonic() - t0 < TIMEOUT + 1.0
    assert wait_gone(lambda: cmdlines_containing(HARNESS_MARKER), 0.5) == []


def test_zygote_restarts_after_being_killed(cv):
    import signal

    from cipo.rewards import sandbox as sandbox_module

    assert cv.verify(fenced(ADD), assert_tests("assert add(1, 2) == 3")).score == 1.0
    mine = [z for (pid, _), z in sandbox_module._zygotes.items() if pid == os.getpid()]
    assert mine
    for z in mine:
        os.kill(z.proc.pid, signal.SIGKILL)
        z.proc.wait()
    assert cv.verify(fenced(ADD), assert_tests("assert add(1, 2) == 3")).score == 1.0
    assert cv.verify(fenced(ADD), assert_tests("assert add(1, 2) == 4")).score == 0.0


def test_zygote_dies_with_its_process(tmp_path):
    """A verifier process killed with SIGKILL leaves no zygote (PDEATHSIG) and no harness behind."""
    import subprocess
    import sys

    from ._helpers import zygote_pids

    script = tmp_path / "child.py"
    script.write_text(
        "import sys, time\n"
        "from cipo.rewards import LocalSandbox\n"
        "sb = LocalSandbox(30.0, 256)\n"
        "assert sb.run_assert('x = 1', ['assert x == 1']).passed\n"
        "print('ready', flush=True)\n"
        "sb.run_assert('while True:\\n    pass', ['assert True'])\n"
    )
    before = set(zygote_pids())
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo)
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(0.3)  # the endless run is under way
        assert set(zygote_pids()) - before
    finally:
        child.kill()
        child.wait()
    assert wait_gone(lambda: sorted(set(zygote_pids()) - before), 2.0) == []
    assert wait_gone(lambda: cmdlines_containing(HARNESS_MARKER), 2.0) == []


def test_stale_run_dirs_of_dead_processes_are_swept(caps):
    import subprocess

    from cipo.rewards import sandbox_processes

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tempfile.mkdtemp(prefix=f"cipo-sbx-{dead.pid}-")
    mine = tempfile.mkdtemp(prefix=f"cipo-sbx-{os.getpid()}-")  # owner alive: kept
    sandbox_processes._swept_in = None  # the sweep runs once per process
    assert LocalSandbox(10.0, 256).run_assert("x = 1", ["assert x == 1"]).passed
    assert not os.path.exists(stale) and os.path.exists(mine)
    os.rmdir(mine)
