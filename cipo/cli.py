"""The ``cipo`` command: ``cipo train CONFIG [--set key=value ...] [--resume]``, ``cipo generate``, ``cipo export``
and ``cipo eval`` (pass@k, correction success and regression rate of a run on a held-out set)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


def _train(args: argparse.Namespace) -> int:
    from .trainer.config import load_config
    from .trainer.trainer import CIPOTrainer, NonFiniteError

    config = load_config(args.config, args.set)
    trainer = CIPOTrainer(config, resume=args.resume, overwrite=args.overwrite)
    if trainer.moved_aside is not None:
        print(f"cipo: --overwrite: the previous run in {config.trainer.run_dir} was moved to {trainer.moved_aside}",
              file=sys.stderr)
    try:
        try:
            summary = trainer.train()
        finally:
            trainer.close()
    except NonFiniteError as exc:  # here, not in main: the other commands never import the trainer
        print(f"cipo: error: {exc}", file=sys.stderr)
        return 1
    if trainer.dist.is_main:
        print(json.dumps(summary, indent=2, sort_keys=True))
        print(f"run directory: {Path(config.trainer.run_dir).resolve()}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .data.dataset import chat_prompt_ids
    from .evaluation import load_run_config, resolve_policy
    from .rollout import SamplingConfig, make_engine

    run_dir = Path(args.run_dir)
    if (run_dir / "config.yaml").is_file():  # a run: its final model, else its latest checkpoint (as `cipo eval`)
        policy = resolve_policy(run_dir, None, load_run_config(run_dir))
        model_dir, weights, label = policy.model_dir, policy.weights, policy.label
    elif (run_dir / "config.json").is_file():  # an HF model directory
        model_dir, weights, label = run_dir, None, str(run_dir)
    else:
        raise FileNotFoundError(f"{run_dir} holds neither a run (config.yaml, made by `cipo train`) nor an HF model "
                                "(config.json)")
    engine = make_engine("hf", model_dir)
    if weights is not None:
        engine.update_weights(weights.items())
    print(f"model: {label}", file=sys.stderr)
    tokenizer = engine.tokenizer
    prompt = chat_prompt_ids(tokenizer, args.prompt)
    sampling = SamplingConfig(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    with torch.no_grad():
        out = engine.generate([prompt], n=args.n, sampling=sampling)
    for k, text in enumerate(out.texts):
        print(f"--- sample {k} ({out.finish_reasons[k]})\n{text}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .trainer.export import export_checkpoint

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / ("hf_model" if args.step is None else f"hf_model_step{args.step}")
    export_checkpoint(run_dir, out, step=args.step)
    print(f"HF model: {out.resolve()}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluation import DEFAULT_N, evaluate_run, parse_ks

    n = args.n if args.n is not None else DEFAULT_N
    ks = parse_ks(args.k, n)  # before loading anything: a bad -k fails at once
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / ("eval" if args.step is None else f"eval_step{args.step}")
    result = evaluate_run(run_dir, step=args.step, data=args.data, n=n, ks=ks, engine=args.engine, seed=args.seed,
                          out=out, prompts=args.prompts, attempts_per_prompt=args.attempts_per_prompt,
                          refinements=args.refinements, temperature=args.temperature, progress=not args.quiet)
    shown = {key: value for key, value in result.items() if key != "correct_counts"}
    print(json.dumps(shown, indent=2, sort_keys=True))
    print(f"eval: {(out / 'eval.json').resolve()} and {(out / 'pass_at_k.png').resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cipo", description="Correction-Oriented Policy Optimization")
    # The `deepspeed` launcher passes --local_rank=N to every process (LOCAL_RANK in the environment says the same).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train with CIPO (or GRPO) from a YAML config")
    train.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set actor.lr=1e-4 (repeatable)")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    start.add_argument("--overwrite", action="store_true",
                       help="trainer.run_dir may hold another run: move it aside to RUN_DIR.replaced-<time> (nothing "
                            "is deleted) and start a new one")
    train.set_defaults(func=_train)
    gen = sub.add_parser("generate", help="sample from a run's final model (hf_model/, else its latest checkpoint) "
                                          "or from an HF model directory")
    gen.add_argument("--run-dir", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("-n", type=int, default=4)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_generate)
    export = sub.add_parser("export", help="write a checkpoint (single-process or DeepSpeed) as an HF model")
    export.add_argument("run_dir")
    export.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the latest)")
    export.add_argument("--out", default=None, help="output directory (default: RUN_DIR/hf_model[_stepN])")
    export.set_defaults(func=_export)
    ev = sub.add_parser("eval", help="held-out accuracy, pass@k, correction success and regression rate of a run")
    ev.add_argument("--run-dir", required=True, help="a `cipo train` run directory")
    ev.add_argument("--step", type=int, default=None,
                    help="checkpoint step to evaluate (default: the final hf_model/; 0: the initial policy)")
    ev.add_argument("--data", default=None,
                    help="JSONL/parquet in verl's columns (default: the run's synthetic held-out split)")
    ev.add_argument("-n", type=int, default=None, help="samples per prompt (default 16)")
    ev.add_argument("-k", default="1,2,4,8,16", help="comma-separated k of pass@k, each <= n (default 1,2,4,8,16)")
    ev.add_argument("--engine", choices=("auto", "vllm", "hf"), default="auto")
    ev.add_argument("--out", default=None, help="output directory (default: RUN_DIR/eval or RUN_DIR/eval_stepN)")
    ev.add_argument("--prompts", type=int, default=None,
                    help="use the first P prompts (synthetic default: the run's data.synthetic_val_size)")
    ev.add_argument("--attempts-per-prompt", type=int, default=None,
                    help="attempts per prompt given to the correction pass (default min(4, n); 0: skip it)")
    ev.add_argument("--refinements", type=int, default=4, help="refinements sampled per correction prompt")
    ev.add_argument("--temperature", type=float, default=None, help="default: the run's rollout.temperature")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=_eval)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    import os

    # vLLM logs every weight reload at INFO; the progress bar is what a user wants to read.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from .data.dataset import DatasetError
    from .evaluation import EvalError
    from .trainer.build_locks import StaleBuildLockError
    from .trainer.checkpoint import CheckpointError
    from .trainer.config_io import ConfigError
    from .trainer.run_dir import RunDirError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DatasetError, EvalError, FileNotFoundError, RunDirError, CheckpointError,
            StaleBuildLockError) as exc:
        print(f"cipo: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # read-only or full disk, permissions: one line (torch chains its own error to the OSError)
        print(f"cipo: error: {describe_os_error(exc, args.command)}", file=sys.stderr)
        return 1


def describe_os_error(exc: OSError, command: str = "train") -> str:
    """One line for an operating-system error: what failed on which file, and what to do."""
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    elsewhere = " or choose another trainer.run_dir" if command == "train" else ""
    hints = {errno.ENOSPC: f"free disk space{elsewhere}", errno.EDQUOT: f"free disk space{elsewhere}",
             errno.EROFS: f"the file system is read-only{elsewhere.replace(' or', ':')}",
             errno.EACCES: f"check the permissions{elsewhere}", errno.EPERM: f"check the permissions{elsewhere}"}
    hint = hints.get(exc.errno, "")
    intact = "; files written before (checkpoints, metrics) are intact" if command == "train" else ""
    return f"{exc.strerror or exc}{where}" + (f"; {hint}" if hint else "") + intact


if __name__ == "__main__":
    sys.exit(main())
