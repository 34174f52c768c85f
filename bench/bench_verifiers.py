"""Throughput of the verifiers: verifications per second, math (10k answers) and code (1k small programs), with 1
and 2 worker processes (:class:`cipo.rewards.VerifierPool`; pool start-up is excluded, a warm-up batch runs first).

    python bench/bench_verifiers.py            # 10k math answers, 1k programs
    python bench/bench_verifiers.py --quick    # 2k math answers, 200 programs (< 2 minutes)

Prints a table and writes bench/results/verifiers_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cipo.rewards import CodeVerifier, MathVerifier, VerifierPool, detect_capabilities  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "verifiers_cpu.json"


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


def bench(verifier, items, workers: int) -> dict:
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


def bench_all(n_math: int, n_code: int, report: Callable[[dict], None]) -> list[dict]:
    """Both verifiers with 1 and 2 workers: one row per run, each passed to ``report`` as it finishes."""
    rows = []
    for name, verifier, items in (
        ("math", MathVerifier(), math_items(n_math)),
        ("code", CodeVerifier(timeout_s=5.0, memory_mb=512), code_items(n_code)),
    ):
        for workers in (1, 2):
            r = bench(verifier, items, workers)
            r["verifier"] = name
            rows.append(r)
            report(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2k math answers and 200 programs")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    n_math, n_code = (2000, 200) if args.quick else (10000, 1000)
    caps = detect_capabilities()
    load_start = [round(x, 2) for x in os.getloadavg()]
    t_start = time.perf_counter()
    rows = bench_all(n_math, n_code, lambda r: print(
        f"{r['verifier']:5s} workers={r['workers']} n={r['n']:6d} {r['seconds']:8.2f} s {r['per_s']:9.1f} /s "
        f"{r['worker_cpu_ms_per_item']:7.2f} CPU-ms/item  mean score {r['mean_score']:.3f}", flush=True))
    print("\n| verifier | workers | items | seconds | verifications/s | worker CPU ms/item |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['verifier']} | {r['workers']} | {r['n']} | {r['seconds']} | {r['per_s']} | "
              f"{r['worker_cpu_ms_per_item']} |")
    out = {
        "quick": args.quick,
        "rows": rows,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "sandbox": caps.describe(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_avg_at_start": load_start, "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "note": ("2-core CPU machine shared with other jobs (see load averages): wall-clock rates are indicative; "
                 "worker CPU ms/item is the load-independent cost"),
    }
    # The generators make ~1/2 (math) and ~2/3 (code) of the items correct: anything else means a broken verifier,
    # and throughput of a broken verifier is meaningless.
    expected = {"math": 0.5, "code": 2 / 3}
    bad = [r for r in rows if abs(r["mean_score"] - expected[r["verifier"]]) > 0.05]
    out["sanity_ok"] = not bad
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if bad:
        sys.exit(f"sanity check failed: mean scores {[(r['verifier'], r['mean_score'], r['reasons']) for r in bad]}")


if __name__ == "__main__":
    main()
