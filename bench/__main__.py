"""One command per benchmark suite.

    python -m bench run --suite cpu --threads 1   # full CPU suite (~15 min on 2 cores): bench/results/cpu.{json,md,png}
    python -m bench run --suite cpu --quick    # small shapes, one run each (< 5 min): bench/results/cpu-quick.*
    python -m bench run --suite gpu            # on a CUDA machine (bench/gpu_suite.sh wraps it with the tests)
    python -m bench report bench/results/cpu.json   # redraw the Markdown table and plots from a JSON
    python -m bench summary bench/results/gpu.json  # print the targets and the headline tables

Each section runs in its own process (loss shapes: every method against the naive baseline in the same process;
trainer; verifiers), under a share of the suite's time budget: work that would start after its section's deadline is
recorded as skipped, and a section that overruns is killed with its partial JSON kept. The merged JSON records the
command, commit, machine, library versions, shapes, medians and spread of the repeated runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results"

# (section key, module, extra args, weight of the remaining budget) per suite.
SECTIONS: dict[str, list[tuple[str, str, list[str], float]]] = {
    "cpu": [("loss", "bench.loss_suite", ["--part", "targets"], 0.66),
            ("trainer", "bench.trainer_suite", [], 0.24),
            ("verifiers", "bench.verifier_suite", [], 0.10)],
    # GPU: the target shapes first, then the tiling study, the trainer, and the sweep with whatever time is left.
    "gpu": [("loss", "bench.loss_suite", ["--part", "targets"], 0.40),
            ("loss_tiling", "bench.loss_suite", ["--part", "tiling"], 0.22),
            ("trainer", "bench.trainer_suite", [], 0.19),
            ("loss_sweep", "bench.loss_suite", ["--part", "sweep"], 0.19)],
}
DEFAULT_BUDGET_S = {("cpu", False): 1200, ("cpu", True): 270, ("gpu", False): 330, ("gpu", True): 200}
GRACE_S = 60  # a section may overrun its deadline by one measurement before it is killed


def _python_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["CIPO_BENCH_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_suite(args: argparse.Namespace) -> int:
    suite, quick = args.suite, args.quick
    name = args.name or (suite + ("-quick" if quick else ""))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or DEFAULT_BUDGET_S[(suite, quick)]
    wanted = [s for s in args.sections.split(",") if s] if args.sections else None
    sections = [s for s in SECTIONS[suite] if wanted is None or s[0] in wanted]
    command = "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    data: dict[str, Any] = {"suite": suite, "quick": quick, "command": command,
                            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            "budget_s": budget, "sections": {}}
    start = time.monotonic()
    failures = 0
    with tempfile.TemporaryDirectory(prefix="cipo-bench-") as tmp:
        for i, (key, module, extra, weight) in enumerate(sections):
            remaining = budget - (time.monotonic() - start)
            share = weight / sum(s[3] for s in sections[i:])
            alloc = max(remaining * share, 30.0)
            kill_after = alloc + GRACE_S
            if args.hard_limit_s:  # never run past the caller's hard limit: keep 10 s to write the files
                kill_after = min(kill_after, args.hard_limit_s - (time.monotonic() - start) - 10)
                if kill_after < 20:
                    data["sections"][key] = {"status": "skipped: no time left under --hard-limit-s"}
                    continue
                alloc = min(alloc, kill_after - 15)
            part = Path(tmp) / f"{key}.json"
            cmd = [sys.executable, "-m", module, "--out", str(part), *extra]
            if module != "bench.verifier_suite":
                cmd += ["--suite", suite, "--deadline-s", f"{alloc:.0f}"]
                if quick:
                    cmd.append("--quick")
                if args.device:
                    cmd += ["--device", args.device]
                if args.shrink > 1:
                    cmd += ["--shrink", str(args.shrink)]
                if args.skip and module == "bench.loss_suite":
                    cmd += ["--skip", args.skip]
            else:
                cmd += ["--size", args.verifier_size or ("1000,100" if quick else "full")]
            print(f"== {key}: {' '.join(shlex.quote(c) for c in cmd[1:])} (budget {alloc:.0f} s)", flush=True)
            t0 = time.monotonic()
            status = "ok"
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=_python_env(args.threads), timeout=kill_after)
                if proc.returncode != 0:
                    status = f"failed: exit code {proc.returncode}"
            except subprocess.TimeoutExpired:
                status = f"killed after {kill_after:.0f} s (section budget + grace); partial results kept"
            result = json.loads(part.read_text()) if part.exists() else {}
            if status != "ok":
                failures += 1
                result["status"] = status
            result["wall_s"] = round(time.monotonic() - t0, 1)
            data["sections"][key] = result
            if "env" in result and "env" not in data:
                data["env"] = result["env"]
            print(f"== {key}: {status} in {result['wall_s']} s", flush=True)
    data["seconds"] = round(time.monotonic() - start, 1)
    if "env" not in data:
        import torch

        from bench._common import environment

        data["env"] = environment(torch.device("cpu"))
    from bench._common import write_json
    from bench.report import write

    json_path = out_dir / f"{name}.json"
    write_json(json_path, data)
    written = [json_path, *write(data, out_dir, name)]
    print(f"wrote {', '.join(str(p) for p in written)} in {data['seconds']} s")
    from bench.report import summary

    print(summary(data))
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a suite")
    r.add_argument("--suite", choices=sorted(SECTIONS), required=True)
    r.add_argument("--quick", action="store_true", help="small shapes, one run per method (CI smoke test)")
    r.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default bench/results)")
    r.add_argument("--name", default=None, help="file stem (default: the suite, plus -quick)")
    r.add_argument("--sections", default=None, help="comma-separated subset of: "
                   + "; ".join(f"{k}: {','.join(s[0] for s in v)}" for k, v in SECTIONS.items()))
    r.add_argument("--skip", default="", help="loss methods to leave out, e.g. compile,liger_grpo")
    r.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the whole suite")
    r.add_argument("--hard-limit-s", type=float, default=None,
                   help="kill sections so that the whole run ends (files written) within this many seconds")
    r.add_argument("--verifier-size", default=None, help="full, quick, or MATH,CODE item counts")
    r.add_argument("--threads", type=int, default=None,
                   help="torch threads in the loss and trainer sections (default: torch's own choice)")
    r.add_argument("--device", default=None, help="run the suite's plan on another device (testing)")
    r.add_argument("--shrink", type=int, default=1, help="divide the shapes by this (testing the plan on a CPU)")
    rep = sub.add_parser("report", help="redraw Markdown and plots from a suite JSON")
    rep.add_argument("json", type=Path)
    summ = sub.add_parser("summary", help="print the targets and headline tables of a suite JSON")
    summ.add_argument("json", type=Path)
    args = ap.parse_args()
    if args.cmd == "summary":
        from bench.report import summary

        print(summary(json.loads(args.json.read_text())))
        return 0
    if args.cmd == "report":
        from bench.report import redraw

        for p in redraw(args.json):
            print(f"wrote {p}")
        return 0
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
