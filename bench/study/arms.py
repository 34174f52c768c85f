"""What the study runs: the arms (config overrides), the per-model study settings, and the jobs (one warm start
per seed where the model has one, then one job per arm × seed), each with its ``cipo train`` / ``cipo eval``
equivalent.

Most arms are fixed overrides (:data:`ARMS`). Three controls derive theirs from the resolved config of the study
(:func:`arm_overrides`), so they stay right whatever the config or ``--set`` says:

* ``grpo_lr065`` — GRPO at ``actor.lr × 0.65`` (is CIPO's cost on the tiny task just a too-large step?);
* ``grpo_matched`` — GRPO with as many samples per step as CIPO: ``rollout.n = G + ⌈B_c·M / B⌉``. CIPO's
  correction samples are further attempts at the *same* step's prompts (its conditioning trajectories come from
  them), so the fair control gives GRPO those extra attempts on the same prompts — a larger group — rather than
  more prompts: the prompt stream then stays the one every other arm of the seed sees (the pairing), and the
  samples per prompt match CIPO's on average. ⌈⌉ when ``B_c·M`` is not a multiple of ``B``: the control gets at
  least CIPO's sample count, never fewer;
* ``cipo_verdict`` — the correction prompt also states the verifier's verdict on the attempt: a ``{verdict}``
  line before the last line of the configured ``user_format`` (after it when that line holds the attempt),
  :data:`VERDICT_CORRECT` for a correct attempt and :data:`VERDICT_INCORRECT` for a failed one
  (:class:`cipo.algorithm.CorrectionTemplate`'s ``verdict_correct``/``verdict_incorrect``): replayed successes are
  told they were right, so the verdict is true for every attempt.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
from pathlib import Path
from typing import Any, Callable, Optional

ARMS: dict[str, list[str]] = {
    "grpo": ["algorithm.correction_enabled=false"],
    "cipo": [],
    "fixed_rho": ["algorithm.rho_step_up=0.0", "algorithm.rho_step_down=0.0"],
    "no_shaping": ["algorithm.alpha=0.0"],
    "no_difficulty": ["algorithm.p_low=0.0", "algorithm.p_high=1.0"],
    "offline": ["algorithm.offline=true"],
    "cipo_lambda_half": ["algorithm.lambda_corr=0.5"],
}
"""Arms whose overrides do not depend on the config."""

ARM_TITLES = {
    "warm_start": "warm start (step 0)",
    "pretrained": "pretrained model (step 0)",
    "grpo": "GRPO (no correction stream)",
    "cipo": "CIPO",
    "fixed_rho": "CIPO, fixed ρ",
    "no_shaping": "CIPO, α = 0",
    "no_difficulty": "CIPO, no difficulty preference",
    "offline": "CIPO, offline replay",
    "cipo_lambda_half": "CIPO, λ = 0.5",
    "grpo_lr065": "GRPO, lr × 0.65",
    "grpo_matched": "GRPO, CIPO's samples per step",
    "cipo_verdict": "CIPO, verdict in the correction prompt",
}

LR_FACTOR = 0.65
VERDICT_CORRECT = "The answer above was judged correct."
VERDICT_INCORRECT = "The answer above was judged incorrect."

# Every job of the study: one torch thread (2 shared cores), no in-training evaluation (the study evaluates
# every run itself, on more prompts), no checkpoints (only the final model is evaluated).
COMMON = ["trainer.num_threads=1", "trainer.eval_prompts=0", "trainer.save_every=0"]

# --quick: a smaller model, batch and response budget, a 20-step warm start and HF rollouts (no vLLM import or
# engine start per process): the whole pipeline in a couple of minutes, numbers meaningless.
QUICK = [
    "algorithm.train_batch_size=8", "rollout.n=4", "algorithm.correction_batch_size=8",
    "algorithm.correction_rollouts=2", "algorithm.template={max_attempt_tokens: 24}", "data.synthetic_train_size=400",
    "rollout.max_response_length=16", "rollout.engine=hf",
    "warmstart.max_steps=20", "warmstart.check_every=20", "warmstart.check_prompts=16",
    "model.tiny_overrides={hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 2,"
    " num_key_value_heads: 1, head_dim: 32}",
]

# --model smollm2: configs/smollm2_arith.yaml (the pretrained SmolLM2-135M-Instruct, no warm start) at a budget
# that fits one job (30 steps + its evaluation) in about 45 min on the 2-core CPU (docs/STUDY.md §7 estimates it):
# 6 prompts × 4 samples and 6 correction prompts × 2 per step (the config's 2 : 1 ratio of base to correction
# samples), 64 response tokens, LoRA (no weight-gradient GEMMs; the LoRA learning rate of the config's header),
# both cores.
SMOLLM2 = [
    "trainer.num_threads=2", "algorithm.train_batch_size=6", "rollout.n=4", "algorithm.correction_batch_size=6",
    "algorithm.correction_rollouts=2", "rollout.max_response_length=64", "algorithm.template.max_attempt_tokens=64",
    "actor.lora.rank=16", "actor.lr=2.0e-4",
]

# --model smollm2 --quick: the same pipeline at a toy size (1 step, 2 prompts, HF rollouts), numbers meaningless.
SMOLLM2_QUICK = [
    "algorithm.train_batch_size=2", "algorithm.correction_batch_size=2", "rollout.max_response_length=24",
    "algorithm.template.max_attempt_tokens=24", "rollout.engine=hf", "data.synthetic_train_size=64",
    "data.synthetic_val_size=8",
]

DEFAULT_ARMS = {"tiny": ["grpo", "cipo", "fixed_rho", "no_shaping", "no_difficulty", "offline"],
                "smollm2": ["grpo", "cipo", "cipo_lambda_half", "grpo_matched", "cipo_verdict"]}
DEFAULT_CONFIG = {"tiny": str(Path("configs") / "tiny.yaml"), "smollm2": str(Path("configs") / "smollm2_arith.yaml")}

# The pre-registered comparisons besides "arm − GRPO" (docs/STUDY.md §7): (arm, reference) pairs.
CONTRASTS = [("cipo", "grpo_matched"), ("cipo_verdict", "cipo")]


def yaml_float(value: float) -> str:
    """``value`` as an override that YAML reads back as the same float (PyYAML reads ``2e-07`` as a string)."""
    text = repr(float(value))
    if "e" in text and "." not in text.split("e")[0]:
        text = text.replace("e", ".0e", 1)
    return text


def verdict_user_format(user_format: str) -> str:
    """``user_format`` with a ``{verdict}`` line before its last line (the request), or after it when the last line
    holds the attempt or there is only one line."""
    head, sep, last = user_format.rpartition("\n")
    if not sep or "{attempt}" in last:
        return user_format + "\n{verdict}"
    return f"{head}\n{{verdict}}\n{last}"


def _grpo_lr065(config: Any) -> list[str]:
    return ["algorithm.correction_enabled=false", f"actor.lr={yaml_float(config.actor.lr * LR_FACTOR)}"]


def _grpo_matched(config: Any) -> list[str]:
    alg = config.cipo_config()
    extra = math.ceil(alg.correction_batch_size * alg.correction_rollouts / alg.train_batch_size)
    return ["algorithm.correction_enabled=false", f"rollout.n={config.rollout.n + extra}"]


def _cipo_verdict(config: Any) -> list[str]:
    fmt = verdict_user_format(config.cipo_config().template.user_format)
    return [f"algorithm.template.user_format={json.dumps(fmt)}",  # a YAML double-quoted string: \n survives
            f"algorithm.template.verdict_correct={json.dumps(VERDICT_CORRECT)}",
            f"algorithm.template.verdict_incorrect={json.dumps(VERDICT_INCORRECT)}",
            "algorithm.template.allow_verdict_words=true"]


DERIVED_ARMS: dict[str, Callable[[Any], list[str]]] = {
    "grpo_lr065": _grpo_lr065, "grpo_matched": _grpo_matched, "cipo_verdict": _cipo_verdict}
"""Arms whose overrides are computed from the study's resolved config (a :class:`cipo.trainer.config.TrainConfig`)."""

ALL_ARMS = [*ARMS, *DERIVED_ARMS]
GRPO_FAMILY = frozenset({"grpo", "grpo_lr065", "grpo_matched"})
"""Arms without a correction stream (their correction metrics are absent or unused)."""


def arm_overrides(arm: str, config: Optional[Any] = None) -> list[str]:
    """The overrides of ``arm``; a derived arm needs the study's resolved ``config``."""
    if arm in ARMS:
        return list(ARMS[arm])
    if arm not in DERIVED_ARMS:
        raise KeyError(f"unknown arm {arm!r}; choose from {','.join(ALL_ARMS)}")
    if config is None:
        raise ValueError(f"arm {arm!r} derives its overrides from the resolved config; pass it")
    return DERIVED_ARMS[arm](config)


def base_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides every job of the study shares (before its seed, run directory and arm)."""
    if args.model == "smollm2":
        profile = [*SMOLLM2, *(SMOLLM2_QUICK if args.quick else [])]
    else:
        profile = QUICK if args.quick else []
    return [*COMMON, *profile, f"trainer.total_steps={args.steps}", *args.set]


def build_jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The spec of every job (what the worker runs, and its commands), seed by seed: for the tiny model a warm
    start (shared by the seed's arms, which load it through ``model.path``) then the arms; for SmolLM2 an
    evaluation of the pretrained model (step 0, no training) then the arms, each from that pretrained model."""
    work = Path(args.work)
    base = base_overrides(args)
    eval_spec = {"n": args.n, "ks": args.k, "prompts": args.eval_prompts, "attempts_per_prompt": args.attempts,
                 "refinements": args.refinements, "seed": args.eval_seed, "engine": args.engine}
    resolved: list[Any] = []

    def study_config() -> Any:  # resolved once, and only when a derived arm asks
        if not resolved:
            from cipo.trainer.config import load_config

            resolved.append(load_config(args.config, base))
        return resolved[0]

    jobs = []
    for seed in args.seed_list:
        start: list[str] = []
        if args.model == "tiny":
            ws_dir = work / f"seed{seed}" / "warm_start"
            ws_set = [*base, f"trainer.seed={seed}", f"trainer.run_dir={ws_dir}", "trainer.total_steps=0"]
            jobs.append({"kind": "warm_start", "arm": "warm_start", "seed": seed, "config": str(args.config),
                         "overrides": ws_set, "run_dir": str(ws_dir), "eval": eval_spec})
            start = [f"model.path={ws_dir / 'init_model'}", "warmstart.max_steps=0",
                     "model.tiny_overrides={}"]  # the warm start's saved model already has them (a ConfigError else)
        else:  # the pretrained model on the seed's held-out split: what every arm starts from (no training)
            start_dir = work / f"seed{seed}" / "pretrained"
            jobs.append({"kind": "pretrained", "arm": "pretrained", "seed": seed, "config": str(args.config),
                         "overrides": [*base, f"trainer.seed={seed}", f"trainer.run_dir={start_dir}",
                                       "trainer.total_steps=0"],
                         "run_dir": str(start_dir), "eval": {**eval_spec, "step": 0}})
        for arm in args.arms:
            run_dir = work / f"seed{seed}" / arm
            extra = arm_overrides(arm, study_config() if arm in DERIVED_ARMS else None)
            arm_set = [*base, f"trainer.seed={seed}", f"trainer.run_dir={run_dir}", *start, *extra]
            jobs.append({"kind": "arm", "arm": arm, "seed": seed, "config": str(args.config), "overrides": arm_set,
                         "run_dir": str(run_dir), "eval": eval_spec})
    return jobs


def job_commands(job: dict[str, Any]) -> list[str]:
    """The ``cipo train`` and ``cipo eval`` commands that do what the job's worker does in one process."""
    sets = " ".join(f"--set {shlex.quote(s)}" for s in job["overrides"])
    ev = job["eval"]
    step = f" --step {ev['step']}" if ev.get("step") is not None else ""
    return [f"cipo train {shlex.quote(job['config'])} {sets}",
            f"cipo eval --run-dir {shlex.quote(job['run_dir'])}{step} -n {ev['n']} -k {ev['ks']} "
            f"--prompts {ev['prompts']} "
            f"--attempts-per-prompt {ev['attempts_per_prompt']} --refinements {ev['refinements']} "
            f"--seed {ev['seed']} --engine {ev['engine']} --quiet"]
