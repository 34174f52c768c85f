"""tests/_launch.run_child, which every multi-process test launches through: a child (and whatever it started)
never outlives its timeout, and the failure shows the child's last output.

Before, tests used ``subprocess.run(..., timeout=...)``: on timeout only the launcher was killed (torchrun's ranks
lived on) and the failure was a bare ``TimeoutExpired`` without the output; some launches had no timeout at all.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests._launch import REPO, child_env, run_child

# Prints, starts a grandchild that would sleep for 10 min (as torchrun starts its ranks), writes the grandchild's
# pid to argv[1], then hangs.
HANGS = """
import subprocess, sys, time
print("child started: the last output before the hang", flush=True)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "w").write(str(grandchild.pid))
time.sleep(600)
"""


def _gone(pid: int, within: float = 10.0) -> bool:
    """The process has exited (or is a zombie waiting for its reaper) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if stat[stat.rindex(")") + 2] == "Z":
            return True
        time.sleep(0.05)
    return False


def _grandchild(pid_file: Path, within: float = 60.0) -> int:
    deadline = time.monotonic() + within
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the child never started its grandchild"
        time.sleep(0.05)
    return int(pid_file.read_text())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_hanging_child_fails_in_time_with_its_last_output_and_leaves_nothing_running(tmp_path: Path):
    pid_file = tmp_path / "grandchild.pid"
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as info:
        run_child([sys.executable, "-c", HANGS, str(pid_file)], timeout=20, what="hanging child")
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "hanging child: still running after its 20 s timeout" in message
    assert "child started: the last output before the hang" in message
    assert elapsed < 60, f"run_child returned {elapsed:.0f} s after start, for a 20 s timeout"
    assert _gone(_grandchild(pid_file)), "the grandchild outlived the timeout (subprocess.run would leave it)"


def test_a_failing_child_fails_with_its_exit_code_and_last_output():
    code = "import sys; print('x' * 20000); sys.stderr.write('the reason it failed'); sys.exit(3)"
    with pytest.raises(pytest.fail.Exception, match=r"(?s)failing child: exit code 3.*the reason it failed"):
        run_child([sys.executable, "-c", code], timeout=60, what="failing child")
    done = run_child([sys.executable, "-c", code], timeout=60, check=False)
    assert done.returncode == 3 and done.stderr == "the reason it failed"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_the_global_pytest_timeout_also_ends_a_child_and_its_group(tmp_path: Path):
    # A test interrupted by pytest-timeout (the suite's last-resort guard, pyproject.toml) while it waits on a child
    # with a longer timeout: the test fails at the guard's limit, the child's group is killed, its output shown.
    pytest.importorskip("pytest_timeout")
    pid_file = tmp_path / "grandchild.pid"
    test = tmp_path / "test_guarded.py"
    test.write_text(
        "import sys\nimport pytest\nfrom tests._launch import run_child\n\n"
        f"HANGS = {HANGS!r}\n\n"
        "@pytest.mark.timeout(20)\n"
        "def test_waits_too_long():\n"
        f"    run_child([sys.executable, '-c', HANGS, {str(pid_file)!r}], timeout=600, what='guarded child')\n")
    proc = run_child([sys.executable, "-m", "pytest", str(test), "-q", "-p", "no:cacheprovider", "--rootdir",
                      str(REPO), "-c", str(REPO / "pyproject.toml")], timeout=240, check=False,
                     env=child_env(PYTHONPATH=str(REPO)), what="pytest on a guarded test")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Timeout" in output and "1 failed" in output, output[-4000:]
    assert "guarded child: interrupted; its last output" in output, output[-4000:]
    assert "child started: the last output before the hang" in output, output[-4000:]
    assert _gone(_grandchild(pid_file)), "the grandchild outlived the interrupted test"
