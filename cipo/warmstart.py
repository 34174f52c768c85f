"""Warm start: a brief supervised fine-tune on worked solutions, so that RL starts where it has signal.

A freshly initialised tiny model never produces a ``\\boxed{}`` answer, so every reward is 0 and GRPO has no
gradient. A short SFT on the synthetic task's worked solutions (``cipo.data.synthetic``) brings held-out sampled
accuracy (T = 1) into the 20-60 % band. The step at which accuracy reaches that band varies from seed to seed (measured
in docs/TRAINER.md, "The tiny model's warm start"), so training stops on a *measured* held-out accuracy
(:class:`AccuracyStopper`) rather than after a fixed count.
Typical errors are then miscomputed or misread columns (often the column that takes a carry, e.g.
``3+9+1=12``) and a boxed answer that disagrees with the columns: visible in the trajectory, fixable on a retry.

Optionally a share of the examples are correction-style (a correction prompt around a correct or a
carry-corrupted attempt, target = the correct solution), so that the correction stream has non-zero reward at
step 0; without them the tiny model answers correction prompts correctly ~0 % of the time.

What it reaches and how long it takes (``python -m bench.warmstart``): docs/TRAINER.md, "The tiny model's warm
start".
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cipo.data.dataset import chat_prompt_ids
from cipo.data.synthetic import corrupt_solution, solution_for

CorrectionBuilder = Callable[[list[dict], str], list[dict]]
"""``(prompt messages, attempt text) -> correction prompt messages`` — e.g.
``lambda p, a: CorrectionTemplate(max_attempt_tokens=None).build(p, a).messages``."""


@dataclass
class WarmStartResult:
    """What :func:`warm_start` did.

    Attributes:
        losses: mean token cross-entropy of each step (fp32 floats, length ``steps``).
        seconds: wall time of the optimisation loop.
        steps: optimizer steps taken.
        examples: training examples seen (``steps * batch_size``).
    """

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    examples: int = 0


def build_sft_examples(
    tokenizer,
    rows: Sequence[dict],
    seed: int = 0,
    correction_builder: CorrectionBuilder | None = None,
    correction_fraction: float = 0.0,
    return_kinds: bool = False,
):
    """``(prompt_ids, target_ids)`` pairs; the target is the worked solution followed by eos.

    With ``correction_builder``, a ``correction_fraction`` share of the rows also yield a correction example whose
    attempt is, with equal odds, the correct solution or one with a forgotten carry (right after its base example).
    With ``return_kinds``, also returns a list of bools marking the correction examples.
    """
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    out = []
    kinds = []
    for row in rows:
        sol = solution_for(row)
        target = list(tokenizer(sol, add_special_tokens=False)["input_ids"]) + [eos]
        out.append((chat_prompt_ids(tokenizer, row["prompt"]), target))
        kinds.append(False)
        if correction_builder is not None and rng.random() < correction_fraction:
            attempt = sol if rng.random() < 0.5 else corrupt_solution(row, rng)
            prompt = row["prompt"] if not isinstance(row["prompt"], str) else [
                {"role": "user", "content": row["prompt"]}]
            out.append((chat_prompt_ids(tokenizer, correction_builder(list(prompt), attempt)), target))
            kinds.append(True)
    return (out, kinds) if return_kinds else out


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` ``[B, L]`` (int64); labels -100 off-target."""
    width = max(len(p) + len(t) for p, t in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for r, (p, t) in enumerate(batch):
        seq = p + t
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        labels[r, len(p) : len(seq)] = torch.tensor(t)
    return ids, mask, labels


def warm_start(
    model,
    tokenizer,
    dataset_rows: Sequence[dict],
    steps: int = 600,
    lr: float = 3e-3,
    seed: int = 0,
    batch_size: int = 32,
    warmup_steps: int = 50,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    correction_builder: CorrectionBuilder | None = None,
    correction_fraction: float = 0.0,
    progress: bool = True,
    on_step: Callable[[int, float], bool | None] | None = None,
) -> WarmStartResult:
    """Supervised fine-tune ``model`` in place on worked solutions of ``dataset_rows``.

    AdamW, linear warm-up then cosine decay to 10 % of ``lr`` over ``steps``; loss = mean token cross-entropy over
    the target tokens (solution + eos) of a batch. Batches are drawn from per-epoch shuffles (``seed``).
    ``steps`` is the budget; pass an :class:`AccuracyStopper` as ``on_step`` to stop in the target accuracy band
    (a fixed count lands in the band only by luck: docs/TRAINER.md, "The tiny model's warm start").

    Args:
        model: a causal LM (``labels``-style forward); left in eval mode afterwards.
        tokenizer: its tokenizer (chat template, eos).
        dataset_rows: synthetic-task rows (``cipo.data.synthetic.make_dataset``).
        steps, lr, batch_size, warmup_steps, weight_decay, max_grad_norm: optimisation knobs.
        seed: shuffling (and correction-example) seed; the model's dropout-free forward is deterministic.
        correction_builder, correction_fraction: see :func:`build_sft_examples`.
        progress: show a tqdm bar with the running loss.
        on_step: called as ``on_step(step, loss)`` after every optimizer step (logging, periodic evals); a truthy
            return value stops training early (see :class:`AccuracyStopper`). Its time counts in ``seconds``.
    """
    from tqdm.auto import tqdm

    examples, is_corr = build_sft_examples(
        tokenizer, dataset_rows, seed, correction_builder, correction_fraction, return_kinds=True
    )
    if not examples:
        raise ValueError("warm_start needs at least one dataset row")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        frac = (step - warmup_steps) / max(1, steps - warmup_steps)
        return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))

    # Correction examples are ~5x longer than base ones; batching each kind separately avoids padding every
    # base example to correction length. Each step draws its kind with probability proportional to its size.
    kinds = [[i for i, c in enumerate(is_corr) if not c], [i for i, c in enumerate(is_corr) if c]]
    kinds = [k for k in kinds if k]
    rng = random.Random(seed)
    orders: list[list[int]] = [[] for _ in kinds]
    result = WarmStartResult()
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="warm start", disable=not progress, leave=False)
    for step in bar:
        kind = rng.choices(range(len(kinds)), weights=[len(k) for k in kinds])[0]
        order = orders[kind]
        while len(order) < batch_size:
            perm = list(kinds[kind])
            rng.shuffle(perm)
            order += perm
        batch = [examples[i] for i in order[:batch_size]]
        del order[:batch_size]
        ids, mask, labels = _collate(batch, pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        logits = out.logits[:, :-1].float()  # [B, L-1, V]; position t predicts token t+1
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        result.losses.append(float(loss.detach()))
        result.steps = step + 1
        if step % 10 == 0:
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
        if on_step is not None and on_step(step, result.losses[-1]):
            break
    bar.close()
    model.eval()
    result.seconds = time.perf_counter() - t0
    result.examples = result.steps * batch_size
    return result


class AccuracyStopper:
    """``on_step`` callback for :func:`warm_start`: every ``every`` steps (from ``min_steps`` on), push the
    weights into a rollout engine, measure sampled accuracy on held-out rows, and stop once it reaches
    ``target``. The step at which the tiny model reaches the 20-60 % band differs between seeds (docs/TRAINER.md,
    "The tiny model's warm start"), so a fixed step count lands in the band only by luck; stopping on a measured
    accuracy lands there every time.

    Attributes:
        history: ``(step, accuracy)`` of every evaluation.
        seconds: time spent evaluating.
    """

    def __init__(
        self,
        model,
        engine,
        tokenizer,
        rows: Sequence[dict],
        target: float = 0.35,
        every: int = 25,
        min_steps: int = 0,
        n: int = 2,
        sampling=None,
        verbose: bool = False,
    ) -> None:
        from cipo.rollout import SamplingConfig

        self.model, self.engine, self.tokenizer, self.rows = model, engine, tokenizer, list(rows)
        self.target, self.every, self.min_steps, self.n = target, every, min_steps, n
        self.sampling = sampling or SamplingConfig(temperature=1.0, max_tokens=48, seed=0)
        self.verbose = verbose
        self.history: list[tuple[int, float]] = []
        self.seconds = 0.0

    def __call__(self, step: int, loss: float) -> bool:
        if (step + 1) < self.min_steps or (step + 1) % self.every:
            return False
        t0 = time.perf_counter()
        self.engine.update_weights(self.model.named_parameters())
        acc = sampled_accuracy(self.engine, self.tokenizer, self.rows, self.sampling, self.n)
        self.history.append((step + 1, acc))
        self.seconds += time.perf_counter() - t0
        if self.verbose:
            print(f"warm start step {step + 1}: loss {loss:.3f}, held-out accuracy {acc:.3f}", flush=True)
        return acc >= self.target


def sampled_accuracy(engine, tokenizer, rows: Sequence[dict], sampling, n: int = 1) -> float:
    """Mean reward of ``n`` completions per row sampled from a ``RolloutEngine`` (uncut chat prompts, one
    ``generate`` call): :func:`cipo.rollout.session.sample_and_score` with the reward router, which scores the
    synthetic task's rows with ``synthetic.score``."""
    from cipo.rewards.router import RewardScorer
    from cipo.rollout.session import PromptCodec, sample_and_score

    codec = PromptCodec(tokenizer)
    _, scores = sample_and_score(engine, RewardScorer(workers=0), [codec.full_ids(r["prompt"]) for r in rows],
                                 rows, n, sampling)
    return sum(scores) / max(1, len(scores))


def build_warm_checkpoint(
    out_dir,
    seed: int = 0,
    difficulty=None,
    target: float = 0.35,
    max_steps: int = 600,
    n_train: int = 5000,
    n_check: int = 128,
    engine_kind: str = "auto",
    correction_builder: CorrectionBuilder | None = None,
    correction_fraction: float = 0.0,
    progress: bool = True,
    **model_overrides,
) -> dict:
    """Build the tiny model, warm-start it until held-out sampled accuracy (T = 1) reaches ``target``, and save
    model + tokenizer to ``out_dir`` (``save_pretrained``; loadable by transformers and vLLM offline).

    The held-out check rows are drawn disjoint from training (``make_splits``, split "test"); the trainer's own
    eval set should be made the same way. A directory already holding a finished build (``warm_start.json``) is
    reused as is. Returns the ``warm_start.json`` record: ``steps``, ``seconds``, ``history`` ((step, accuracy)
    of the checks), ``final_loss`` and the arguments.
    """
    import json
    import os
    from dataclasses import asdict
    from pathlib import Path

    from cipo.data.synthetic import Difficulty, make_splits
    from cipo.models.tiny import build_tiny_model, build_tiny_tokenizer

    out = Path(out_dir)
    record_path = out / "warm_start.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from cipo.rollout import make_engine

    diff = Difficulty.coerce(difficulty)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(out)
    model = build_tiny_model(out, tok, seed=seed, **model_overrides)  # random init, read by the engine
    train, check = make_splits(n_train, n_check, seed=seed, difficulty=diff)
    engine = make_engine(engine_kind, out)
    try:
        stopper = AccuracyStopper(model, engine, tok, check, target=target, every=25, min_steps=100)
        res = warm_start(model, tok, train, steps=max_steps, seed=seed, progress=progress, on_step=stopper,
                         correction_builder=correction_builder, correction_fraction=correction_fraction)
    finally:
        engine.close()
    model.save_pretrained(str(out))
    record = {
        "seed": seed,
        "difficulty": asdict(diff),
        "target": target,
        "steps": res.steps,
        "seconds": res.seconds,
        "final_loss": res.losses[-1],
        "history": stopper.history,
        "reached_target": bool(stopper.history and stopper.history[-1][1] >= target),
        "correction_fraction": correction_fraction if correction_builder is not None else 0.0,
        "model_overrides": model_overrides,
    }
    record_path.write_text(json.dumps(record, indent=1))
    return record
