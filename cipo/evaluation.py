"""Held-out evaluation of a trained run: sampled accuracy, pass@k, correction success and regression rate.

``cipo eval --run-dir RUN [--step N] [--data FILE] -n 16 -k 1,2,4,8,16`` (or :func:`evaluate_run`) loads a run's
policy — the final ``hf_model/``, a checkpoint, or step 0 (the policy RL started from) — and, on a held-out set:

1. samples ``n`` responses per prompt at the run's rollout temperature and verifies them (the run's reward
   routing, :class:`cipo.rewards.router.RewardScorer`): ``accuracy`` is the share of verified samples, and
   ``pass@k`` the unbiased estimator ``1 − C(n−c, k) / C(n, k)`` averaged over prompts (``c`` verified of ``n``);
2. takes the first ``attempts_per_prompt`` samples of every prompt as attempts (the samples are i.i.d., so these
   are a random subset), builds the run's correction prompt ``template(x, attempt)`` around each — the prompt the
   correction stream trains on, with no verdict and no ground truth — and samples ``refinements`` responses each:
   ``correction_success`` is, over failed attempts, the mean share of refinements that verify; ``regression_rate``
   is, over correct attempts, the mean share of refinements that fail.

Both passes go through :class:`cipo.rollout.session.RolloutSession` (``sample_rows``, ``sample_corrections``), the
path the trainer's own in-training evaluation (``CIPOTrainer.evaluate``) takes too: the same prompt codec (chat
template, ``data.truncation``), the same correction prompts, the same reward routing.

The held-out set is the run's synthetic test split (disjoint from its training prompts; its first
``trainer.eval_prompts`` rows are the ones the trainer evaluated on) or any JSONL/parquet file in verl's columns.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 8, 16)
DEFAULT_N = 16
DEFAULT_ATTEMPTS = 4  # attempts per prompt given to the correction pass (at most n)
# Refinements draw seeds far from the attempts' (engines seed prompt i of a call with seed + i).
CORRECTION_SEED_OFFSET = 10_000_019
CHUNK_PROMPTS = 32  # prompts per generate call: granularity of the progress bar (seeds do not depend on it)


class EvalError(ValueError):
    """A bad evaluation request: a k list, a sample count, a run directory or data file that cannot be used."""


# ------------------------------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with ``c`` verified samples out of ``n``: ``1 − C(n−c, k) / C(n, k)``.

    Computed as ``1 − Π_{i=n−c+1}^{n} (1 − k/i)`` (Chen et al., 2021), a product of ``c`` factors in [0, 1):
    no huge binomials, no cancellation between them. The probability that ``k`` samples drawn without
    replacement from the ``n`` contain at least one verified sample.
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k needs ints; got n={n!r}, c={c!r}, k={k!r}")
    if n < 1 or not 0 <= c <= n:
        raise EvalError(f"pass_at_k: need n >= 1 and 0 <= c <= n; got n={n}, c={c}")
    if not 1 <= k <= n:
        raise EvalError(f"pass_at_k: k={k} must be in [1, n={n}] (k samples are drawn from the n)")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_pass_at_k(correct_counts: Sequence[int], n: int, ks: Sequence[int]) -> dict[int, float]:
    """``{k: mean over prompts of pass_at_k(n, c, k)}``."""
    if not correct_counts:
        raise EvalError("mean_pass_at_k: no prompts")
    return {k: sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts) for k in ks}


def parse_ks(text: Union[str, Sequence[int]], n: int) -> tuple[int, ...]:
    """The k list (``"1,2,4,8,16"`` or ints), checked against ``n``: sorted, duplicates dropped.

    Raises:
        EvalError: an entry that is not an integer, k < 1, k > n, or an empty list.
    """
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or any(not p for p in parts):
            raise EvalError(f"-k {text!r}: expected comma-separated integers such as 1,2,4,8,16")
        try:
            ks = [int(p) for p in parts]
        except ValueError:
            raise EvalError(f"-k {text!r}: expected comma-separated integers such as 1,2,4,8,16") from None
    else:
        ks = list(text)
        if not ks or not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
            raise EvalError(f"ks={text!r}: expected a non-empty list of ints")
    if not isinstance(n, int) or n < 1:
        raise EvalError(f"-n {n!r}: the number of samples per prompt must be an int >= 1")
    bad = [k for k in ks if k < 1]
    if bad:
        raise EvalError(f"-k: every k must be >= 1; got {bad}")
    over = [k for k in ks if k > n]
    if over:
        raise EvalError(f"-k: k={over} exceeds -n {n}: pass@k is estimated from n samples per prompt, so k <= n "
                        f"(raise -n to at least {max(over)})")
    return tuple(sorted(set(ks)))


def correction_metrics(attempt_correct: Sequence[bool], refinement_correct: Sequence[bool],
                       refinements: int) -> dict[str, Any]:
    """Correction success, regression rate and related counts of one correction pass.

    Args:
        attempt_correct: ``[A]`` whether each attempt verified.
        refinement_correct: ``[A * refinements]`` whether each refinement verified, attempt-major.
        refinements: refinements per attempt.

    Returns ``correction_success`` (over failed attempts, the mean share of refinements that verify),
    ``regression_rate`` (over correct attempts, the mean share of refinements that fail), ``attempt_accuracy``,
    ``accuracy_after_correction`` (the share of all refinements that verify: accuracy after one correction pass
    over the attempts) and the attempt counts; a rate without attempts to measure it on is NaN.
    """
    if len(refinement_correct) != len(attempt_correct) * refinements:
        raise ValueError(f"{len(refinement_correct)} refinement results for {len(attempt_correct)} attempts x "
                         f"{refinements} refinements")
    fixed, kept = [], []
    for a, correct in enumerate(attempt_correct):
        share = sum(bool(x) for x in refinement_correct[a * refinements:(a + 1) * refinements]) / refinements
        (kept if correct else fixed).append(share)
    total = len(attempt_correct)
    return {
        "correction_success": _mean(fixed),
        "regression_rate": 1.0 - _mean(kept) if kept else math.nan,
        "attempt_accuracy": len(kept) / total if total else math.nan,
        "accuracy_after_correction": (sum(kept) + sum(fixed)) / total if total else math.nan,
        "failed_attempts": len(fixed),
        "correct_attempts": len(kept),
    }


def resampling_baselines(correct_counts: Sequence[int], n: int) -> dict[str, float]:
    """What sampling the original prompt once more gives, in the terms of :func:`correction_metrics`.

    A failed sample of a prompt with ``c`` verified of ``n`` is followed by a verified fresh sample with
    probability ``c / (n − 1)`` (estimated from the prompt's other samples), a correct one by a failing sample
    with probability ``(n − c) / (n − 1)``. Averaged over every failed (correct) sample of every prompt, these are
    ``resample_success`` and ``resample_regression``: the expectation of the same baselines over which samples
    are the attempts (the samples are exchangeable), with less variance. A correction prompt that makes use of
    the attempt beats them; one the model reads as the bare problem again only matches them.
    """
    if n < 2:
        return {"resample_success": math.nan, "resample_regression": math.nan}
    failed = sum(n - c for c in correct_counts)
    correct = sum(correct_counts)
    both = sum(c * (n - c) for c in correct_counts) / (n - 1)  # failed-correct pairs, per sample
    return {"resample_success": both / failed if failed else math.nan,
            "resample_regression": both / correct if correct else math.nan}


# ------------------------------------------------------------------------------------------------- the run


@dataclass
class RunPolicy:
    """Where a run's policy comes from.

    Attributes:
        model_dir: the HF directory the engine loads (the final model, or the initial one).
        weights: checkpoint weights pushed into the engine after loading (None: ``model_dir`` as it is).
        label: what was loaded, for reports (``"hf_model"``, ``"checkpoint step 30"``, ``"step 0 (initial)"``).
        step: the step evaluated (None for the final model).
    """

    model_dir: Path
    weights: Optional[dict]
    label: str
    step: Optional[int]


def load_run_config(run_dir: Union[str, Path]):
    """The :class:`cipo.trainer.config.TrainConfig` a run was trained with (``RUN/config.yaml``)."""
    from .trainer.config import load_run_config as load_recorded_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a cipo run directory: no config.yaml (made by `cipo train`)")
    return load_recorded_config(config_file)  # runs recorded before rollout.n was the group size included


def resolve_policy(run_dir: Union[str, Path], step: Optional[int], config) -> RunPolicy:
    """The policy to evaluate: step None → ``hf_model/`` (else the latest checkpoint); 0 → the initial model;
    N → the checkpoint of step N."""
    from .trainer.checkpoint import latest_checkpoint
    from .trainer.export import checkpoint_weights, find_checkpoint, initial_model_dir

    run_dir = Path(run_dir)
    if step is not None and (not isinstance(step, int) or step < 0):
        raise EvalError(f"--step {step!r}: expected an int >= 0 (0 = the initial policy)")
    if step == 0:
        return RunPolicy(initial_model_dir(run_dir, config.model.path), None, "step 0 (initial policy)", 0)
    if step is None:
        if (run_dir / "hf_model" / "config.json").is_file():
            return RunPolicy(run_dir / "hf_model", None, "hf_model (final policy)", None)
        path = latest_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
        if path is None:
            raise FileNotFoundError(f"{run_dir} has no final model (hf_model/) and no checkpoint; did training "
                                    "finish? Use --step 0 for the initial policy")
    else:
        try:
            path = find_checkpoint(run_dir, step)
        except FileNotFoundError:
            have = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) if (
                run_dir / "checkpoints").is_dir() else []
            raise FileNotFoundError(f"{run_dir} has no checkpoint of step {step}; available: "
                                    f"{have or 'none'} (and --step 0, the initial policy)") from None
    label_step = int(path.name.removeprefix("step_").removesuffix(".pt"))
    return RunPolicy(initial_model_dir(run_dir, config.model.path), checkpoint_weights(path),
                     f"checkpoint step {label_step}", label_step)


def held_out_rows(config, data: Optional[Union[str, Path]], prompts: Optional[int]) -> tuple[list[dict], str]:
    """The evaluation rows and a description: ``data`` (JSONL/parquet, verl columns), else the run's synthetic
    test split (``prompts`` rows, default ``data.synthetic_val_size``), else the run's ``data.val_files``."""
    from .data.dataset import DatasetError, load_dataset

    if prompts is not None and (not isinstance(prompts, int) or prompts < 1):
        raise EvalError(f"--prompts {prompts!r}: expected an int >= 1")
    if data is not None:
        rows = load_dataset(data)  # FileNotFoundError / DatasetError ("no rows") name the file
        source = str(data)
    elif not config.data.train_files and not config.data.val_files:
        from .data.tasks import make_task_splits

        count = prompts or config.data.synthetic_val_size
        _, rows = make_task_splits(config.data.synthetic_task, config.data.synthetic_train_size, count,
                                   seed=config.trainer.seed, difficulty=config.data.synthetic_difficulty or None)
        difficulty = config.data.synthetic_difficulty or "default"
        source = (f"synthetic {config.data.synthetic_task} held-out split (seed {config.trainer.seed}, difficulty "
                  f"{difficulty}, disjoint from "
                  "the run's training prompts)")
    elif config.data.val_files:
        rows = [row for path in config.data.val_files for row in load_dataset(path)]
        source = ",".join(config.data.val_files)
    else:
        raise EvalError("the run trained on data.train_files without data.val_files: pass --data FILE")
    if not rows:
        raise DatasetError(f"{source}: no rows")
    return (rows[:prompts] if prompts else rows), source


def evaluate_run(run_dir: Union[str, Path], step: Optional[int] = None, data: Optional[Union[str, Path]] = None,
                 n: int = DEFAULT_N, ks: Union[str, Sequence[int]] = DEFAULT_KS, engine: str = "auto", seed: int = 0,
                 out: Optional[Union[str, Path]] = None, prompts: Optional[int] = None,
                 attempts_per_prompt: Optional[int] = None, refinements: int = 4, temperature: Optional[float] = None,
                 progress: bool = True, plot: bool = True) -> dict[str, Any]:
    """Evaluate a run's policy on a held-out set (module docstring); returns the result dict and, with ``out``,
    writes ``eval.json`` and ``pass_at_k.png`` there.

    Args:
        run_dir: a ``cipo train`` run directory.
        step: None (final ``hf_model/``), 0 (the initial policy) or a checkpoint's step.
        data: a JSONL/parquet file in verl's columns; None → the run's held-out set.
        n: samples per prompt; ks: the k of pass@k (each <= n).
        engine: ``auto`` (vLLM when installed), ``vllm`` or ``hf``.
        seed: sampling seed (prompt i of the attempts gets ``seed + i``).
        prompts: use the first ``prompts`` rows (synthetic: the size of the test split drawn).
        attempts_per_prompt: attempts per prompt given to the correction pass (0: no correction pass; default
            ``min(4, n)``).
        refinements: responses sampled per correction prompt.
        temperature: sampling temperature (default: the run's ``rollout.temperature``).
    """
    import torch

    from .rewards.router import SYNTHETIC_SOURCES, RewardScorer
    from .rollout.session import PromptCodec, RolloutSession, engine_from_config, sampling_from_config, screen_prompts

    ks = parse_ks(ks, n)
    if attempts_per_prompt is None:
        attempts_per_prompt = min(DEFAULT_ATTEMPTS, n)
    if not isinstance(attempts_per_prompt, int) or not 0 <= attempts_per_prompt <= n:
        raise EvalError(f"attempts_per_prompt={attempts_per_prompt!r}: expected an int in [0, n={n}]")
    if not isinstance(refinements, int) or refinements < 1:
        raise EvalError(f"refinements={refinements!r}: expected an int >= 1")
    if engine not in ("auto", "vllm", "hf"):
        raise EvalError(f"--engine {engine!r}: expected auto, vllm or hf")
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    policy = resolve_policy(run_dir, step, config)
    rows, source = held_out_rows(config, data, prompts)
    template = config.cipo_config().template
    rollout = config.rollout
    temp = rollout.temperature if temperature is None else float(temperature)
    if not temp > 0:
        raise EvalError(f"temperature={temp}: pass@k needs sampling, temperature > 0")
    sampling = sampling_from_config(config, seed, temperature=temp, return_logprobs=False)
    started = time.perf_counter()
    # the engine alone on the device (not sized or shared as during training); vLLM seeded with the eval seed
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rollout_engine = engine_from_config(config, policy.model_dir, device, kind=engine, seed=seed, colocated=False)
    synthetic_only = all(row.get("data_source") in SYNTHETIC_SOURCES for row in rows)
    scorer = RewardScorer(workers=0 if synthetic_only else 2)
    try:
        if policy.weights is not None:
            rollout_engine.update_weights(policy.weights.items())
        codec = PromptCodec.from_config(rollout_engine.tokenizer, config)
        # the trainer's rule: refused above data.max_truncated_fraction, dropped or cut as data.truncation says
        rows, screen = screen_prompts(rows, codec.full_ids, config, "held-out")
        session = RolloutSession(rollout_engine, scorer, codec, chunk_prompts=CHUNK_PROMPTS)
        attempt_batch, scores = session.sample_rows(rows, n, sampling, desc="eval: attempts" if progress else None)
        texts = attempt_batch.texts
        counts = [sum(s >= 1.0 for s in scores[i * n:(i + 1) * n]) for i in range(len(rows))]
        result: dict[str, Any] = {
            "accuracy": sum(counts) / (len(rows) * n),
            "pass_at_k": {str(k): v for k, v in mean_pass_at_k(counts, n, ks).items()},
        }
        if attempts_per_prompt > 0:
            attempts = [(i, i * n + j) for i in range(len(rows)) for j in range(attempts_per_prompt)]
            attempt_correct = [scores[k] >= 1.0 for _, k in attempts]
            _, corr_scores = session.sample_corrections(
                template, rows, [(i, texts[k]) for i, k in attempts], refinements,
                dataclasses.replace(sampling, seed=seed + CORRECTION_SEED_OFFSET),
                desc="eval: refinements" if progress else None, correct=attempt_correct)
            result.update(correction_metrics(attempt_correct,
                                             [s >= 1.0 for s in corr_scores], refinements))
            result.update(resampling_baselines(counts, n))
        result.update({
            "run_dir": str(run_dir), "model": policy.label, "step": policy.step, "data": source,
            "prompts": len(rows), "n": n, "ks": list(ks), "engine": type(rollout_engine).__name__,
            "seed": seed, "temperature": temp, "max_tokens": rollout.max_response_length,
            "attempts_per_prompt": attempts_per_prompt, "refinements": refinements,
            "correct_counts": counts, "seconds": time.perf_counter() - started,
            "prompts_over_limit": screen["over_limit"], "prompts_cut": codec.cut_count,
        })
    finally:
        rollout_engine.close()
        scorer.close()
    if out is not None:
        write_outputs(result, Path(out), plot=plot)
    return result


def write_outputs(result: dict[str, Any], out: Path, plot: bool = True) -> None:
    """``out/eval.json`` and (with ``plot``) ``out/pass_at_k.png``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if plot:
        plot_pass_at_k({result.get("model", "policy"): result["pass_at_k"]}, out / "pass_at_k.png",
                       title=f"pass@k, {result['prompts']} prompts, n = {result['n']}")


def plot_pass_at_k(curves: dict[str, dict[str, float]], path: Path, title: str = "pass@k") -> Path:
    """pass@k against k (log2 axis), one line per label of ``curves`` (``{label: {"k": value}}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, values in curves.items():
        ks = sorted(int(k) for k in values)
        ax.plot(ks, [values[str(k)] for k in ks], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan
