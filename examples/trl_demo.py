"""CIPO through TRL on the tiny arithmetic task: a warm-started tiny Qwen3, TRL's GRPOTrainer with cipo's head, loss
and correction stream (:class:`CipoCorrectionGRPOTrainer`), held-out accuracy before and after.

    $(bash scripts/integration_env.sh trl)/bin/python examples/trl_demo.py --out runs/trl_demo [--baseline]

``--warm-dir`` reuses a warm-started checkpoint (``cipo.warmstart.build_warm_checkpoint``; built here with the HF
engine when missing). ``--baseline`` also trains TRL's own ``GRPOTrainer`` (no correction stream) from the same
checkpoint with the same settings. Held-out accuracy is sampled through cipo's rollout session
(:func:`cipo.warmstart.sampled_accuracy`: an HF engine on the model in memory, seeded per prompt, T = 1). Writes
``summary.json`` and each run's TRL log history to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

TEMPLATE = dict(user_format="{problem}\nPrevious attempt: {attempt}\nSolve the problem again.",
                max_attempt_tokens=64)  # configs/tiny.yaml's


def _warm_checkpoint(path: Path) -> dict:
    from cipo.algorithm import CorrectionTemplate
    from cipo.models.tiny import build_tiny_tokenizer
    from cipo.rollout.session import PromptCodec
    from cipo.warmstart import build_warm_checkpoint

    template = CorrectionTemplate(**TEMPLATE)
    codec = PromptCodec(build_tiny_tokenizer())

    def builder(prompt, attempt):
        return template.build(prompt, attempt, encode=codec.encode, decode=codec.decode).messages

    return build_warm_checkpoint(path, seed=0, target=0.35, engine_kind="hf", progress=False,
                                 correction_builder=builder, correction_fraction=0.5)


def held_out_accuracy(model, tokenizer, rows: list[dict], samples: int, max_new_tokens: int, seed: int) -> float:
    """Mean verifier score of ``samples`` completions per row of ``model`` (in memory), sampled at T = 1."""
    from cipo.rollout import HFEngine, SamplingConfig
    from cipo.warmstart import sampled_accuracy

    sampling = SamplingConfig(temperature=1.0, max_tokens=max_new_tokens, seed=seed, return_logprobs=False)
    return sampled_accuracy(HFEngine(model=model, tokenizer=tokenizer), tokenizer, rows, sampling, samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm-dir", default="runs/trl_demo/warm_model")
    parser.add_argument("--out", default="runs/trl_demo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--baseline", action="store_true", help="also train TRL's GRPOTrainer (no corrections)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from cipo.algorithm import CIPOConfig
    from cipo.data.synthetic import make_splits, score
    from cipo.integrations.trl import CipoCorrectionGRPOTrainer

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warm = Path(args.warm_dir)
    t0 = time.perf_counter()
    warm_record = _warm_checkpoint(warm)
    train_rows, val_rows = make_splits(2000, 64, seed=0)
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["reward_model"]["ground_truth"]}
                              for r in train_rows])

    def accuracy(completions, answer, **_):
        return [score(c[0]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)]

    tok = AutoTokenizer.from_pretrained(str(warm))
    model = AutoModelForCausalLM.from_pretrained(str(warm))
    before = held_out_accuracy(model, tok, val_rows, 4, 48, seed=1)
    summary: dict = {"warm_start": warm_record, "eval_accuracy_before": before, "runs": {}}
    print(f"held-out accuracy before RL: {before:.3f}", flush=True)

    runs = [("cipo_correction", CipoCorrectionGRPOTrainer)] + ([("trl_grpo", GRPOTrainer)] if args.baseline else [])
    for name, cls in runs:
        config = GRPOConfig(output_dir=str(out / name), per_device_train_batch_size=128, num_generations=8,
                            max_completion_length=48, temperature=1.0, learning_rate=2e-4,
                            lr_scheduler_type="constant_with_warmup", warmup_steps=2, max_grad_norm=1.0,
                            epsilon=0.2, epsilon_high=0.28, loss_type="dapo", beta=0.0, max_steps=args.steps,
                            logging_steps=1, report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0,
                            disable_tqdm=True)
        kwargs = {}
        if cls is CipoCorrectionGRPOTrainer:
            kwargs["cipo_config"] = CIPOConfig(correction_batch_size=8, correction_rollouts=8, lambda_corr=1.0,
                                               alpha=0.5, template=TEMPLATE)
        t = time.perf_counter()
        trainer = cls(model=str(warm), reward_funcs=accuracy, args=config, train_dataset=data, **kwargs)
        trainer.train()
        seconds = time.perf_counter() - t
        after = held_out_accuracy(trainer.model, tok, val_rows, 4, 48, seed=1)
        history = [h for h in trainer.state.log_history if "loss" in h]
        (out / f"{name}_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        first, last = history[:5], history[-5:]
        summary["runs"][name] = {
            "eval_accuracy_after": after, "seconds": round(seconds, 1), "steps": len(history),
            "train_reward_first5": sum(h["reward"] for h in first) / len(first),
            "train_reward_last5": sum(h["reward"] for h in last) / len(last),
            "corr_success_first5": _mean([h.get("cipo/corr/success") for h in first]),
            "corr_success_last5": _mean([h.get("cipo/corr/success") for h in last]),
        }
        print(f"{name}: held-out accuracy {before:.3f} -> {after:.3f} in {seconds:.0f} s; "
              f"{json.dumps(summary['runs'][name])}", flush=True)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


if __name__ == "__main__":
    main()
