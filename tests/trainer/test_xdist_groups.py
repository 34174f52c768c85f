"""The README runs the suite on two pytest-xdist workers: the tests that must not overlap share a group
(tests/conftest.py), and every test file that starts several ranks or the code sandbox is in one."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import SERIAL_GROUPS, TESTS, serial_group


def test_groups_of_known_files() -> None:
    assert serial_group(TESTS / "rewards" / "test_rewards_code.py") == "sandbox"
    assert serial_group(TESTS / "distributed" / "test_deepspeed.py") == "ranks"
    assert serial_group(TESTS / "long_context" / "test_ulysses_trainer.py") == "ranks"
    assert serial_group(TESTS / "rollout" / "test_vllm_data_parallel.py") == "ranks"
    assert serial_group(TESTS / "rollout" / "test_vllm_engine.py") is None
    assert serial_group(TESTS / "trainer" / "test_train_e2e.py") is None
    assert all((TESTS / prefix).exists() for prefix in SERIAL_GROUPS), "a group names a path that is gone"


def test_every_multi_rank_or_sandbox_test_file_is_grouped() -> None:
    # A file that launches ranks (torch.distributed.run / --nproc_per_node) or runs the code sandbox must not run
    # beside another such file on the 2-core machine.
    launches = re.compile(r"nproc_per_node|torch\.distributed\.run|CodeVerifier|sandbox\.run|run_in_sandbox")
    loose = [str(path.relative_to(TESTS)) for path in TESTS.rglob("test_*.py")
             if "integrations" not in path.parts and path != Path(__file__)
             and launches.search(path.read_text(encoding="utf-8")) and serial_group(path) is None]
    assert not loose, f"test files that start ranks or sandboxes but have no xdist group: {loose}"


def test_the_readme_test_command_uses_the_groups() -> None:
    readme = (Path(TESTS).parent / "README.md").read_text(encoding="utf-8")
    command = next(line for line in readme.splitlines() if re.search(r"#\s*test\b", line) and "pytest" in line)
    assert "--dist loadgroup" in command, command


def test_a_group_really_runs_on_one_worker() -> None:
    # xdist's own marker handling is a no-op under pytest 9 (it sets a node attribute pytest no longer reads);
    # tests/conftest.py sets the group suffix itself. Two workers, one group: every test lands on one worker.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/rewards/test_rewards_api.py", "-n", "2", "--dist",
                           "loadgroup", "-v", "-p", "no:cacheprovider"], cwd=TESTS.parent, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    workers = set(re.findall(r"^\[(gw\d+)\]", proc.stdout, flags=re.MULTILINE))
    assert len(workers) == 1 and "@sandbox" in proc.stdout, proc.stdout[-3000:]
