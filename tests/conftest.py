"""Test-session setup shared by every test directory.

Triton kernels run on CPU tensors only through the interpreter, and the interpreter must be switched on
before triton is imported anywhere in the process — hence here, at the root, before any test module loads.
On a CUDA machine the kernels compile for real instead.

The README's test command runs the suite on two pytest-xdist workers (``-n 2 --dist loadgroup``). Tests that must not
overlap with each other share an ``xdist_group``, whose tests run one after another on one worker:

- ``sandbox``: the code sandbox's tests check machine-wide that no sandbox directory or sandbox-uid process outlives
  them, so another worker's sandbox runs would look like their leaks;
- ``ranks``: tests that start two or more ranks (DeepSpeed, sequence parallelism, vLLM data parallelism) keep both
  cores busy on their own; two of them at once on a 2-core machine run past their timeouts.

The files in :data:`EXCLUSIVE_FILES` bound wall-clock times (a hostile program is killed within 1 s of its deadline)
and must have the machine to themselves: while one runs, the other worker waits before its next test (a lock file
per run: shared by every test, exclusive for such a file).
"""

import fcntl
import os
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TESTS = Path(__file__).resolve().parent
SERIAL_GROUPS = {  # a directory or file under tests/ -> its xdist group
    "rewards": "sandbox",
    "distributed": "ranks",
    "long_context": "ranks",
    "rollout/test_vllm_data_parallel.py": "ranks",
}


EXCLUSIVE_FILES = frozenset({"rewards/test_rewards_code.py"})


def serial_group(path: Path) -> str | None:
    """The xdist group of a test file (``None``: any worker, in any order)."""
    rel = Path(path).resolve().relative_to(TESTS).as_posix()
    for prefix, group in SERIAL_GROUPS.items():
        if rel == prefix or rel.startswith(prefix + "/"):
            return group
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = serial_group(item.path)
        if group is None:
            continue
        item.add_marker(pytest.mark.xdist_group(group))
        # xdist's loadgroup scheduler keys on an "@group" suffix of the node id. Its worker adds the suffix by
        # setting ``item._nodeid``, which pytest 9 no longer reads (the id lives in ``item._id``): without this,
        # the groups are silently ignored (measured: the sandbox tests ran on both workers).
        if getattr(config.option, "loadgroup", False) and "@" not in item.nodeid:
            item._id = f"{item.nodeid}@{group}"


def _run_lock(mode: int):
    """The run's machine lock (a POSIX record lock on a file named by xdist's run id), held in ``mode``; None
    outside xdist. POSIX locks, not flock: a process a test forks (a vLLM or sandbox worker that outlives the test)
    does not inherit them, so no child can keep the other worker waiting."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        return None
    handle = open(os.path.join(tempfile.gettempdir(), f"cipo-pytest-{run}.lock"), "a+")
    fcntl.lockf(handle, mode)
    return handle


def _is_exclusive(path: Path) -> bool:
    return Path(path).resolve().relative_to(TESTS).as_posix() in EXCLUSIVE_FILES


@pytest.fixture(scope="module", autouse=True)
def _machine_to_this_module(request: pytest.FixtureRequest):
    handle = _run_lock(fcntl.LOCK_EX) if _is_exclusive(request.path) else None
    yield
    if handle is not None:
        handle.close()  # releases the lock


@pytest.fixture(autouse=True)
def _machine_shared(request: pytest.FixtureRequest):
    # Not inside an exclusive module: this process already holds the lock there.
    handle = None if _is_exclusive(request.path) else _run_lock(fcntl.LOCK_SH)
    yield
    if handle is not None:
        handle.close()

