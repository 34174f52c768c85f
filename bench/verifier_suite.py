"""Throughput of the verifiers: verifications per second, math answers (through math-verify) and small programs
(through the sandbox), with 1 and 2 worker processes (:class:`cipo.rewards.VerifierPool`; pool start-up excluded, a
warm-up batch first), and the CPU time of the worker process trees per item (the load-independent cost).

    python -m bench.verifier_suite                # 10k math answers, 1k programs → bench/results/verifiers_cpu.json
    python -m bench.verifier_suite --quick        # 2k math answers, 200 programs (< 2 minutes)
    python -m bench.verifier_suite --size 1000,100 --out PATH   # any sizes (the CPU suite's verifier section)

Prints a table and writes the JSON. The item generators make about half of the math answers and two thirds of the
programs correct; a mean score outside 5 points of that is recorded as ``sanity_ok: false`` (a broken verifier's
throughput means nothing; for a few hundred items the band is too tight to be a check).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from pathlib import Path
from typing import Any, Callable, Optional

from bench._common import RESULTS, log, write_json
from bench.report import verifier_table

SIZES = {"full": (10000, 1000), "quick": (2000, 200)}
DEFAULT_OUT = RESULTS / "verifiers_cpu.json"
# The generators' share of correct items; a mean score further than SANITY_BAND from it means a broken verifier.
EXPECTED_SCORE = {"math": 0.5, "code": 2 / 3}
SANITY_BAND = 0.05


def math_items(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Responses as a policy writes them (reasoning + final answer), 8 per ground truth, ~half correct."""
    rng = random.Random(seed)
    items = []
    filler = "We expand, collect terms and simplify step by step. " * 8
    for i in range(n):
        kind = i // 8 % 6
        a, b = rng.randint(1, 40), rng.randint(2, 40)
        correct = rng.random() < 0.5
        if kind == 0:
            gold, ans = rf"\frac{{{a}}}{{{b}}}", (rf"\frac{{{a}}}{{{b}}}" if correct else rf"\frac{{{a + 1}}}{{{b}}}")
        elif kind == 1:
            gold, ans = str(a / 4), (rf"\frac{{{a}}}{{4}}" if correct else str(a / 4 + 1))
        elif kind == 2:
            gold, ans = rf"{a}\sqrt{{2}}", (rf"\sqrt{{{2 * a * a}}}" if correct else rf"{a}\sqrt{{3}}")
        elif kind == 3:
            gold, ans = f"[{a}, {a + b})", (f"[{a},{a + b})" if correct else f"({a},{a + b})")
        elif kind == 4:
            gold, ans = str(a * b), (f"{a * b}" if correct else f"{a * b + 1}")
        else:
            gold, ans = f"x^2 + {2 * a}x + {a * a}", (f"(x+{a})^2" if correct else f"(x-{a})^2")
        tail = rf"Therefore the answer is $\boxed{{{ans}}}$." if i % 5 else f"The answer is {ans}."
        items.append((f"{filler}{tail}", gold))
    return items


def code_items(n: int, seed: int = 0) -> list[tuple[str, dict]]:
    """Small programs in both test formats, ~2/3 correct."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        k = rng.randint(1, 9)
        correct = i % 3 != 0
        if i % 2 == 0:
            body = f"def f(x):\n    return x * {k if correct else k + 1}\n"
            tests = {"type": "assert", "tests": [f"assert f({j}) == {j * k}" for j in range(1, 4)]}
        else:
            body = f"n = int(input())\nprint(sum(range(n + {0 if correct else 1})))\n"
            tests = {"type": "stdio", "cases": [{"input": f"{j}\n", "output": f"{sum(range(j))}\n"} for j in (3, 10)]}
        items.append((f"Solution:\n```python\n{body}```", tests))
    return items


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a live process tree: each live process's own time plus that of its reaped children."""
    tick = os.sysconf("SC_CLK_TCK")
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


def measure(verifier: Any, items: list, workers: int) -> dict[str, Any]:
    """One timed ``VerifierPool.map`` over ``items`` with ``workers`` processes (after a warm-up batch)."""
    from cipo.rewards import VerifierPool

    with VerifierPool(verifier, workers=workers) as pool:
        pool.map(items[: 4 * workers])  # warm-up: start-up, imports, sandbox capability probe
        pids = [w.proc.pid for w in pool._workers]
        cpu0 = sum(_tree_cpu(p) for p in pids)
        t0 = time.perf_counter()
        res = pool.map(items)
        dt = time.perf_counter() - t0
        # Workers replaced during the run (none expected here) would be missed: then the CPU figure is a floor.
        cpu = sum(_tree_cpu(p) for p in pids) - cpu0
    return {"workers": workers, "n": len(items), "seconds": round(dt, 3), "per_s": round(len(items) / dt, 1),
            "worker_cpu_ms_per_item": round(1000 * cpu / len(items), 2), "replaced_workers": pool.replaced,
            "mean_score": round(sum(r.score for r in res) / len(res), 4),
            "reasons": {k: sum(r.reason == k for r in res) for k in sorted({r.reason for r in res})}}


def measure_all(n_math: int, n_code: int, report: Callable[[dict], None]) -> list[dict[str, Any]]:
    """Both verifiers with 1 and 2 workers: one row per run, each passed to ``report`` as it finishes."""
    from cipo.rewards import CodeVerifier, MathVerifier

    rows = []
    for name, verifier, items in (
        ("math", MathVerifier(), math_items(n_math)),
        ("code", CodeVerifier(timeout_s=5.0, memory_mb=512), code_items(n_code)),
    ):
        for workers in (1, 2):
            r = measure(verifier, items, workers)
            r["verifier"] = name
            rows.append(r)
            report(r)
    return rows


def insane_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose mean score is further than :data:`SANITY_BAND` from the generators' share of correct items."""
    return [r for r in rows if abs(r["mean_score"] - EXPECTED_SCORE[r["verifier"]]) > SANITY_BAND]


def run(n_math: int, n_code: int) -> dict[str, Any]:
    """The measurement at the given sizes, as the JSON records it (also the CPU suite's ``verifiers`` section)."""
    from cipo.rewards import detect_capabilities

    caps = detect_capabilities()
    load_start = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    rows = measure_all(n_math, n_code, lambda r: log(
        f"[verifiers] {r['verifier']} workers={r['workers']} n={r['n']} {r['per_s']} /s "
        f"{r['worker_cpu_ms_per_item']} CPU-ms/item mean score {r['mean_score']}"))
    return {"section": "verifiers", "sizes": {"math": n_math, "code": n_code}, "rows": rows,
            "sandbox": caps.describe(), "sanity_ok": not insane_rows(rows),
            "seconds": round(time.perf_counter() - t0, 1),
            "load_avg": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "note": ("wall-clock rates on a shared machine are indicative; worker CPU ms/item is the "
                     "load-independent cost")}


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.verifier_suite", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="full", help="full (10k answers, 1k programs), quick, or MATH,CODE item counts")
    ap.add_argument("--quick", action="store_true", help="the same as --size quick")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    size = "quick" if args.quick else args.size
    n_math, n_code = SIZES[size] if size in SIZES else map(int, size.split(","))
    data = run(n_math, n_code)
    write_json(args.out, data)
    print("\n" + "\n".join(verifier_table(data)) + f"\nwrote {args.out}")
    bad = insane_rows(data["rows"])
    if bad:
        log(f"sanity check failed: mean scores {[(r['verifier'], r['mean_score'], r['reasons']) for r in bad]}")


if __name__ == "__main__":
    main()
