"""``python -m bench.study``: the command line — settings per model, then the jobs one at a time, with a partial
report after each (an interrupted study keeps what finished)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .arms import ALL_ARMS, CONTRASTS, DEFAULT_ARMS, DEFAULT_CONFIG, build_jobs
from .probes import probe_run
from .report import write_report
from .runner import REPO, run_job, run_worker
from .stats import eval_metrics

DESCRIPTION = "Does CIPO beat GRPO here? A seeded, paired study with ablations and controls."

# Settings that differ from the parser's defaults, per model and mode. The tiny model's defaults are the parser's;
# with --quick its smoke run (numbers meaningless). SmolLM2: the pre-registered study (docs/STUDY.md §7) and its
# smoke run. A value given on the command line always wins.
MODEL_DEFAULTS: dict[tuple[str, bool], dict[str, Any]] = {
    ("tiny", True): {"seeds": 1, "arms": "grpo,cipo", "steps": 3, "eval_prompts": 16, "n": 4, "k": "1,2,4",
                     "attempts": 1, "refinements": 2, "engine": "hf",
                     "out": str(Path("runs") / "study_quick" / "results"), "work": str(Path("runs") / "study_quick")},
    ("smollm2", False): {"eval_prompts": 32, "k": "1,4,16", "attempts": 1, "refinements": 4,
                         "out": str(Path("bench") / "results" / "study_smollm2"),
                         "work": str(Path("runs") / "study_smollm2")},
    ("smollm2", True): {"seeds": 1, "steps": 1, "eval_prompts": 4, "n": 4, "k": "1,2,4", "attempts": 1,
                        "refinements": 2, "engine": "hf",
                        "out": str(Path("runs") / "study_smollm2_quick" / "results"),
                        "work": str(Path("runs") / "study_smollm2_quick")},
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.study", description=DESCRIPTION)
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                        help="tiny: configs/tiny.yaml from a warm start per seed; smollm2: configs/smollm2_arith.yaml "
                             "from the pretrained SmolLM2-135M-Instruct (no warm start), at the study's budget")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--seed-list", default=None, help="explicit comma-separated seeds (overrides --seeds)")
    parser.add_argument("--arms", default=None,
                        help=f"comma-separated, from {','.join(ALL_ARMS)} (default: tiny "
                             f"{','.join(DEFAULT_ARMS['tiny'])}; smollm2 {','.join(DEFAULT_ARMS['smollm2'])})")
    parser.add_argument("--config", default=None, help="default: configs/tiny.yaml, or configs/smollm2_arith.yaml")
    parser.add_argument("--steps", type=int, default=30, help="training steps per arm")
    parser.add_argument("--eval-prompts", type=int, default=96, help="held-out prompts per evaluation")
    parser.add_argument("-n", type=int, default=16, help="samples per held-out prompt")
    parser.add_argument("-k", default="1,2,4,8,16", help="k of pass@k")
    parser.add_argument("--attempts", type=int, default=2, help="attempts per prompt given to the correction pass")
    parser.add_argument("--refinements", type=int, default=4, help="refinements per correction prompt")
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--engine", choices=("auto", "vllm", "hf"), default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every job (repeatable), e.g. data.synthetic_difficulty=...")
    parser.add_argument("--out", default=str(Path("bench") / "results" / "study"))
    parser.add_argument("--work", default=str(Path("runs") / "study"), help="run directories")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 seed, few steps, small batches, tiny eval (tiny: grpo+cipo, 3 steps; "
                             "smollm2: its five arms, 1 step of 2 prompts)")
    parser.add_argument("--probe", nargs="+", default=None, metavar="RUN_DIR",
                        help="instead of a study: error classes and refinement behaviour of finished runs (JSON)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker or args.probe:
        return args
    for key, value in MODEL_DEFAULTS.get((args.model, args.quick), {}).items():
        if getattr(args, key) == parser.get_default(key):
            setattr(args, key, value)
    if args.arms is None:
        args.arms = ",".join(DEFAULT_ARMS[args.model])
    if args.config is None:
        args.config = DEFAULT_CONFIG[args.model]
    args.contrasts = CONTRASTS if args.model == "smollm2" else []
    args.seed_list = ([int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds)))
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ALL_ARMS]
    if unknown or not args.arms:
        parser.error(f"--arms: unknown {unknown}; choose from {','.join(ALL_ARMS)}")
    if not args.seed_list:
        parser.error("--seeds must be >= 1")
    from cipo.evaluation import EvalError, parse_ks

    try:
        ks = parse_ks(args.k, args.n)
    except EvalError as exc:
        parser.error(str(exc))
    args.k = ",".join(map(str, ks))
    if args.attempts > args.n:
        parser.error(f"--attempts {args.attempts} exceeds -n {args.n}")
    if not Path(args.config).is_file() and not (REPO / args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return run_worker(Path(args.worker))
    if args.probe:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        for run_dir in args.probe:
            print(json.dumps(probe_run(Path(run_dir)), indent=1), flush=True)
        return 0
    from tqdm.auto import tqdm

    jobs = build_jobs(args)
    started = time.perf_counter()
    records = []
    starts = " + warm start" if args.model == "tiny" else ""
    print(f"study: {len(args.seed_list)} seed(s) × ({len(args.arms)} arms{starts}) = {len(jobs)} jobs, "
          f"{args.steps} steps each; runs under {args.work}, results to {args.out}", flush=True)
    bar = tqdm(jobs, desc="study", unit="job", dynamic_ncols=True)
    for job in bar:
        bar.set_postfix(seed=job["seed"], arm=job["arm"])
        log = Path(job["run_dir"]).with_name(f"{job['arm']}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        record = run_job(job, log, Path(args.out))
        records.append(record)
        m = eval_metrics(record["eval"])
        tqdm.write(f"seed {job['seed']} {job['arm']:<13} {'(reused) ' if record.get('reused') else ''}"
                   f"{time.perf_counter() - t0:6.1f} s (train {record['train_seconds']:.0f} s, eval "
                   f"{record['eval_seconds']:.0f} s): acc {m['accuracy']:.3f}  pass@{args.k.split(',')[-1]} "
                   f"{m.get('pass@' + args.k.split(',')[-1], math.nan):.3f}  corr {m['correction_success']:.3f}  "
                   f"regr {m['regression_rate']:.3f}")
        # a partial report after every job: an interrupted study still leaves its finished jobs on disk
        write_report(Path(args.out), args, jobs, records, time.perf_counter() - started, argv)
    bar.close()
    study = write_report(Path(args.out), args, jobs, records, time.perf_counter() - started, argv)
    print((Path(args.out) / "table.md").read_text())
    print(f"study: {len(jobs)} jobs in {study['wall_seconds'] / 60:.1f} min; {Path(args.out).resolve()}")
    return 0
