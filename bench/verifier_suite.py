"""Verifier section: the rewards issue's throughput benchmark (``bench/bench_verifiers.py``), run at a chosen size.

Uses that module's item generators and its ``bench`` function unchanged (math answers through math-verify, small
programs through the sandbox; 1 and 2 worker processes; pool start-up excluded, a warm-up batch first), so the
numbers are the same measurement as ``python bench/bench_verifiers.py`` at the sizes given here.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, Optional

from bench._common import log, write_json

SIZES = {"full": (10000, 1000), "quick": (2000, 200)}


def run(n_math: int, n_code: int) -> dict[str, Any]:
    from bench.bench_verifiers import bench_all
    from cipo.rewards import detect_capabilities

    caps = detect_capabilities()
    load_start = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    rows = bench_all(n_math, n_code, lambda r: log(
        f"[verifiers] {r['verifier']} workers={r['workers']} n={r['n']} {r['per_s']} /s "
        f"{r['worker_cpu_ms_per_item']} CPU-ms/item mean score {r['mean_score']}"))
    expected = {"math": 0.5, "code": 2 / 3}  # the generators' share of correct items (bench_verifiers' check)
    bad = [r for r in rows if abs(r["mean_score"] - expected[r["verifier"]]) > 0.05]
    return {"section": "verifiers", "sizes": {"math": n_math, "code": n_code}, "rows": rows,
            "sandbox": caps.describe(), "sanity_ok": not bad, "seconds": round(time.perf_counter() - t0, 1),
            "load_avg": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
            "note": ("wall-clock rates on a shared machine are indicative; worker CPU ms/item is the "
                     "load-independent cost")}


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="verifier section of the CPU suite")
    ap.add_argument("--size", default="quick", help="full, quick, or MATH,CODE item counts")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    n_math, n_code = SIZES[args.size] if args.size in SIZES else map(int, args.size.split(","))
    write_json(args.out, run(n_math, n_code))


if __name__ == "__main__":
    main()
