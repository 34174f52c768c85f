"""verify_batch / VerifierPool: order, per-item timeouts, crashes, replacement, real verifiers."""

from __future__ import annotations

import os
import time

import pytest

from cipo.rewards import CodeVerifier, MathVerifier, RewardResult, VerifierPool, verify_batch

from ._helpers import ToyVerifier


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(ToyVerifier(), workers=2, item_timeout_s=1.0) as p:
        yield p


def test_results_in_input_order(pool):
    items = [("ok", i / 20) for i in range(20)]
    res = pool.map(items)
    assert [r.score for r in res] == [i / 20 for i in range(20)]
    assert all(r.reason == "ok" for r in res)
    slow = pool.map([("sleep", 0.3)] * 4)
    assert len({r.details["pid"] for r in slow}) == 2  # both workers take items


def test_hung_item_is_killed_and_replaced(pool):
    t0 = time.monotonic()
    res = pool.map([("ok", 1.0), ("sleep", 30.0), ("ok", 0.5), ("spin", 0.0), ("ok", 0.25)])
    elapsed = time.monotonic() - t0
    assert [r.score for r in res] == [1.0, 0.0, 0.5, 0.0, 0.25]
    assert res[1].reason == "timeout" and res[3].reason == "timeout"
    assert elapsed < 6.0, elapsed  # two 1 s deadlines + respawns, never the 30 s sleep
    assert all(w.proc.is_alive() for w in pool._workers)  # replaced, ready for the next batch
    assert pool.map([("ok", 1.0)])[0].score == 1.0


def test_crash_and_exception_score_zero(pool):
    res = pool.map([("crash", 0.0), ("ok", 1.0), ("raise", 0.0), ("ok", 1.0)])
    assert [r.score for r in res] == [0.0, 1.0, 0.0, 1.0]
    assert res[0].reason == "worker_died" and res[2].reason == "error"
    assert "boom" in res[2].details["error"]


def test_bad_items_do_not_kill_the_batch(pool):
    res = pool.map([("ok", 1.0), ("ok",), ("ok", 1.0)])  # wrong arity -> TypeError inside the worker
    assert [r.score for r in res] == [1.0, 0.0, 1.0]
    res = pool.map([("ok", 1.0), ("ok", lambda: 0), ("ok", 0.5), ("ok", 0.25)])  # unpicklable item
    assert [r.score for r in res] == [1.0, 0.0, 0.5, 0.25]
    assert res[1].reason == "error" and "dispatch failed" in res[1].details["error"]


def test_chunks_keep_per_item_deadlines():
    """A hang in the middle of a chunk: that item times out, the rest of its chunk is re-sent elsewhere."""
    with VerifierPool(ToyVerifier(), workers=2, item_timeout_s=1.0, chunk_size=4) as p:
        items = [("ok", 0.1), ("sleep", 30.0), ("ok", 0.2), ("ok", 0.3), ("ok", 0.4), ("ok", 0.5)]
        t0 = time.monotonic()
        res = p.map(items)
        assert [r.score for r in res] == [0.1, 0.0, 0.2, 0.3, 0.4, 0.5]
        assert res[1].reason == "timeout" and time.monotonic() - t0 < 6.0


def test_workers_zero_runs_inline():
    res = verify_batch(ToyVerifier(), [("ok", 1.0), ("raise", 0.0)], workers=0)
    assert [r.score for r in res] == [1.0, 0.0]
    assert res[0].details["pid"] == os.getpid()


def test_empty_batch(pool):
    assert pool.map([]) == []


def test_math_batch_matches_sequential():
    mv = MathVerifier(timeout_s=2)
    items = [(rf"\boxed{{{i % 7}}}", str(i % 5)) for i in range(30)] + [("no answer", "1")]
    seq = [mv.verify(*it) for it in items]
    par = verify_batch(mv, items, workers=2)
    assert [r.score for r in par] == [r.score for r in seq]
    assert all(isinstance(r, RewardResult) for r in par)


def test_code_batch_with_hostile_item():
    cv = CodeVerifier(timeout_s=1.0, memory_mb=256)
    ok = "```python\ndef f():\n    return 1\n```"
    loop = "```python\nwhile True:\n    pass\n```"
    tests = {"type": "assert", "tests": ["assert f() == 1"]}
    t0 = time.monotonic()
    res = verify_batch(cv, [(ok, tests), (loop, tests), (ok, tests), (loop, tests)], workers=2)
    assert [r.score for r in res] == [1.0, 0.0, 1.0, 0.0]
    assert res[1].reason == "timeout"
    assert time.monotonic() - t0 < 20.0


def test_killed_worker_takes_its_sandbox_with_it():
    """The pool's deadline (1 s) fires while the sandbox (10 s budget) still runs: the PDEATHSIG chain and the pid
    namespace take the whole sandbox down with the killed worker."""
    from cipo.rewards.sandbox import HARNESS_MARKER

    from ._helpers import cmdlines_containing, wait_gone

    cv = CodeVerifier(timeout_s=10.0, memory_mb=256)
    loop = "```python\nimport os\nos.fork()\nwhile True:\n    pass\n```"
    tests = {"type": "assert", "tests": ["assert True"]}
    res = verify_batch(cv, [(loop, tests)], workers=1, item_timeout_s=1.0)
    assert res[0].score == 0.0 and res[0].reason == "timeout"
    assert wait_gone(lambda: cmdlines_containing(HARNESS_MARKER), 2.0) == []
