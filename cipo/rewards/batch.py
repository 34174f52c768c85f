"""Parallel verification in worker *processes* with a per-item deadline.

``concurrent.futures.ProcessPoolExecutor`` cannot kill one hung task (a timeout there breaks the whole pool), so
this is a small pool of its own: one duplex pipe per worker, one item in flight per worker. A worker whose item
passes its deadline is SIGKILLed and replaced; one that dies is replaced; that item gets score 0 with a reason and
the rest of the batch goes on. Results come back in input order.

Workers run each item in their main thread, so math-verify's ``signal.alarm`` timeouts work there. A killed worker's
sandbox processes die with it (PDEATHSIG chain, pid namespace); leftovers of its uid slot are also killed when the
slot is next acquired.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Any, Iterable, Sequence

from .types import RewardResult, Verifier

_START_TIMEOUT_S = 120.0  # a worker that is not ready by then is replaced
_MAX_START_FAILURES = 3  # consecutive workers that die before ready: give up on the batch (score 0, reason)
_PRELOAD = ["cipo.rewards", "cipo.rewards.math_verifier", "math_verify"]
# Exit status of a worker that found itself starting a pool while re-importing the caller's main script (no
# `if __name__ == "__main__":` guard); the parent turns it into NoMainGuardError.
_NO_MAIN_GUARD_EXIT = 86


class NoMainGuardError(RuntimeError):
    """verify_batch / VerifierPool was started from the top level of a script without a ``__main__`` guard."""


def _no_main_guard_message() -> str:
    # In a worker re-importing the script, the script runs as `__mp_main__`.
    module = sys.modules.get("__mp_main__") or sys.modules.get("__main__")
    main = getattr(module, "__file__", None) or "your script"
    return (f"verify_batch/VerifierPool was called at the top level of {main} without an "
            f"`if __name__ == \"__main__\":` guard. Its worker processes (start method 'forkserver' or 'spawn') "
            f"import the main script again, which starts another pool instead of verifying. Move the code that "
            f"calls verify_batch/VerifierPool under `if __name__ == \"__main__\":` (or call it with workers=0 to "
            f"verify inline).")


def _worker_main(conn: Any, verifier: Verifier) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it kills us
    conn.send(("ready", os.getpid()))  # item deadlines start only once start-up (imports, unpickling) is over
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for idx, args in chunk:  # one answer per item, as soon as it is done: the parent's deadline is per item
            try:
                res = verifier.verify(*args)
                if not isinstance(res, RewardResult):
                    res = RewardResult(0.0, "error", {"error": f"verifier returned {type(res).__name__}"})
            except BaseException as exc:  # noqa: BLE001 -- report, never die on one item
                res = RewardResult(0.0, "error", {"error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            try:
                conn.send((idx, res))
            except Exception as exc:  # e.g. an unpicklable detail: still answer
                err = {"error": f"unpicklable details: {exc!r}"[:200]}
                conn.send((idx, RewardResult(res.score, res.reason, err)))


def default_item_timeout(verifier: Any) -> float:
    """Per-item deadline when none is given: the verifier's own bound plus slack for start-up and scheduling."""
    t = float(getattr(verifier, "timeout_s", 10.0))
    from .math_verifier import MathVerifier

    if isinstance(verifier, MathVerifier):
        return 2.0 * t + 2.0  # parse + a couple of comparisons, each under its own alarm
    return t + 5.0


class _Worker:
    def __init__(self, ctx: Any, verifier: Verifier) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, verifier), daemon=True)
        self.proc.start()
        child.close()
        self.queue: deque[int] = deque()  # item indices sent, in the order the worker answers them
        self.deadline = 0.0  # for queue[0]
        self.ready = False
        self.start_deadline = time.monotonic() + _START_TIMEOUT_S

    def kill(self) -> None:
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):
            pass
        self.proc.join(5)
        self.conn.close()


class VerifierPool:
    """A reusable pool of verifier worker processes (start once, verify many batches).

    Args:
        verifier: a picklable object with ``verify(response, reference) -> RewardResult``.
        workers: number of worker processes (>= 1).
        item_timeout_s: per-item deadline (default :func:`default_item_timeout`).
        start_method: ``"forkserver"`` (default where available: fast replacement, no fork of a threaded parent)
            or ``"spawn"``.
        chunk_size: contiguous items sent to a worker at once (default: up to 16, at least 4 chunks per worker).
    """

    def __init__(self, verifier: Verifier, workers: int = 2, item_timeout_s: float | None = None,
                 start_method: str | None = None, chunk_size: int | None = None) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1 (use verify_batch(workers=0) to run inline)")
        if getattr(mp.current_process(), "_inheriting", False):
            # We are a worker of a pool in the parent, re-importing its main script (no __main__ guard) before
            # our own start-up is done: say why on stderr and exit with a status the parent recognises.
            sys.stderr.write(f"cipo.rewards worker: {_no_main_guard_message()}\n")
            sys.stderr.flush()
            os._exit(_NO_MAIN_GUARD_EXIT)
        self.verifier = verifier
        self.n_workers = int(workers)
        self.chunk_size = chunk_size
        self.item_timeout_s = float(item_timeout_s) if item_timeout_s else default_item_timeout(verifier)
        if start_method is None:
            start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            # Imported once in the fork server, so each (re)started worker is a cheap fork. No effect when the
            # fork server of this process is already running.
            self._ctx.set_forkserver_preload(_PRELOAD)
        self._workers: list[_Worker] = []
        self.replaced = 0  # workers killed or found dead and replaced (diagnostics)

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.verifier)

    def map(self, items: Iterable[Sequence[Any]]) -> list[RewardResult]:
        """Verify ``items`` (each the ``verify`` arguments, e.g. ``(response, ground_truth)``), in input order.

        Items go out in contiguous chunks (``chunk_size``): fewer round trips, and neighbours -- in RL the G
        responses to one prompt -- land in one worker, whose caches (parsed ground truth, repeated answers) then hit.
        """
        items = list(items)
        results: list[RewardResult | None] = [None] * len(items)
        while len(self._workers) < min(self.n_workers, max(1, len(items))):
            self._workers.append(self._spawn())
        chunk = self.chunk_size or max(1, min(16, len(items) // (4 * self.n_workers)))
        pending = deque(range(len(items)))
        start_failures = 0

        def replace(w: _Worker) -> None:
            # The worker's current item has its result already; the rest of its chunk goes back in line, in order.
            while w.queue:
                idx = w.queue.pop()
                if results[idx] is None:
                    pending.appendleft(idx)
            w.kill()
            self._workers[self._workers.index(w)] = self._spawn()
            self.replaced += 1

        while pending or any(w.queue for w in self._workers):
            for w in self._workers:
                if w.ready and not w.queue and pending:
                    ids = [pending.popleft() for _ in range(min(chunk, len(pending)))]
                    try:
                        w.conn.send([(i, tuple(items[i])) for i in ids])
                    except Exception as exc:  # an unpicklable item (or a worker that just died): one by one
                        if len(ids) == 1 or not w.proc.is_alive():
                            results[ids[0]] = RewardResult(0.0, "error", {"error": f"dispatch failed: {exc!r}"[:200]})
                            ids = ids[1:]
                        pending.extendleft(reversed(ids))
                        if not w.proc.is_alive():
                            replace(w)
                        chunk = 1
                        continue
                    w.queue.extend(ids)
                    w.deadline = time.monotonic() + self.item_timeout_s
            if not pending and not any(w.queue for w in self._workers):
                break
            now = time.monotonic()
            deadlines = [w.deadline if w.ready else w.start_deadline for w in self._workers if w.queue or not w.ready]
            handles = {}
            for w in self._workers:
                if w.queue or not w.ready:
                    handles[w.conn] = w
                    handles[w.proc.sentinel] = w
            ready = wait(list(handles), timeout=max(0.0, min(deadlines, default=now) - now))
            for w in {id(handles[h]): handles[h] for h in ready}.values():
                died = False
                while True:  # drain everything this worker has sent
                    try:
                        if not w.conn.poll():
                            break
                        got = w.conn.recv()
                    except (EOFError, OSError):
                        died = True
                        break
                    if not w.ready and got[0] == "ready":
                        w.ready = True
                        start_failures = 0
                    elif w.queue and got[0] == w.queue[0]:
                        results[w.queue.popleft()] = got[1]
                        w.deadline = time.monotonic() + self.item_timeout_s
                    else:
                        died = True  # protocol violation: treat as dead
                        break
                if died or not w.proc.is_alive():
                    if not w.ready:
                        w.proc.join(1.0)
                        if w.proc.exitcode == _NO_MAIN_GUARD_EXIT:
                            self.close()
                            raise NoMainGuardError(_no_main_guard_message())
                    if w.queue:
                        results[w.queue.popleft()] = RewardResult(0.0, "worker_died", {"exitcode": w.proc.exitcode})
                    elif not w.ready:
                        start_failures += 1
                    replace(w)
            now = time.monotonic()
            for w in list(self._workers):
                if w.queue and now >= w.deadline:
                    results[w.queue.popleft()] = RewardResult(0.0, "timeout", {"item_timeout_s": self.item_timeout_s})
                    replace(w)
                elif not w.ready and now >= w.start_deadline:
                    start_failures += 1
                    replace(w)
            if start_failures >= _MAX_START_FAILURES * self.n_workers:
                for w in self._workers:
                    pending.extend(w.queue)
                    w.queue.clear()
                for idx in pending:
                    results[idx] = RewardResult(0.0, "worker_start_failed", {})
                break
        return [r if r is not None else RewardResult(0.0, "error", {"error": "no result"}) for r in results]

    def close(self) -> None:
        """Stop the workers (politely, then by force)."""
        for w in self._workers:
            try:
                w.conn.send(None)
            except Exception:
                pass
        deadline = time.monotonic() + 2.0
        for w in self._workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.kill()
            else:
                w.conn.close()
        self._workers = []


def verify_batch(verifier: Verifier, items: Iterable[Sequence[Any]], workers: int = 2,
                 item_timeout_s: float | None = None, pool: VerifierPool | None = None) -> list[RewardResult]:
    """Verify ``items`` in parallel worker processes; results in input order; failures and timeouts score 0.

    ``workers=0`` runs inline in this process (no isolation, no per-item deadline beyond math-verify's own alarms;
    for debugging). Pass ``pool`` to reuse running workers across batches (the RL loop should).

    Raises :class:`NoMainGuardError` when called at the top level of a script without an
    ``if __name__ == "__main__":`` guard (the workers would re-run the script); bad items never raise.
    """
    if pool is not None:
        return pool.map(items)
    if workers <= 0:
        out = []
        for args in items:
            try:
                out.append(verifier.verify(*args))
            except Exception as exc:
                out.append(RewardResult(0.0, "error", {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}))
        return out
    with VerifierPool(verifier, workers=workers, item_timeout_s=item_timeout_s) as p:
        return p.map(items)
