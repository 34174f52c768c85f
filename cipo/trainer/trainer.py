"""The thin CIPO trainer: rollouts (vLLM or HF) → verification → correction stream → packed step on the fused
loss → optimizer → weights back into the rollout engine.

One step (docs/DESIGN.md §2)::

    prompts ─ engine.generate(n=G) ─ verify ─ pass-rate tracker
            ─ selector(ρ) + template ─ engine.generate(n=M) ─ verify ─ shaping ─ replay controller
            ─ assemble_step → PackedBatch ─ micro-batches by token budget:
                  packed forward → hidden [n, H] → fused_linear_policy_loss(hidden, W_head, ...) → backward
            ─ clip, AdamW, warm-up schedule ─ engine.update_weights(policy)

The run directory holds ``metrics.jsonl`` (one line per step), ``curves.png``, ``summary.json``,
``config.yaml``, the initial model (``init_model/``, what the engine loads), ``checkpoints/`` and the final
policy as an HF model (``hf_model/``).

The constructor builds the run from :mod:`cipo.trainer.setup` (data, policy, reference model),
:mod:`cipo.rollout.session` (prompt codec, rollout engine, sampling and scoring) and :mod:`cipo.trainer.backend`
(optimizer, packed forward + loss); :meth:`CIPOTrainer.train_step` reads top-down:
base stream (sample, score) → :meth:`CIPOTrainer._correction_stream` → assemble → update → push weights → metrics.

Under a launcher (``torchrun``/``deepspeed``, ``actor.strategy: deepspeed``) every rank runs this same loop:
generation is split by prompts and gathered, so all ranks hold the whole step and take the same decisions;
training is split by whole groups (:mod:`cipo.trainer.distributed`); rank 0 writes the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml

from ..algorithm import (
    CorrectionStream,
    PromptResult,
    Rollout,
    RolloutGroup,
    Trajectory,
    assemble_step,
    step_advantages,
)
from ..config import PolicyLossConfig
from ..packing import PackedBatch
from ..rewards.router import RewardScorer
from ..rollout import RolloutBatch
from ..rollout.session import PromptCodec, RolloutSession, engine_from_config, sampling_from_config, screen_prompts
from .backend import export_hf, make_backend
from .checkpoint import (
    CheckpointError,
    atomic_write_text,
    checkpoint_path,
    latest_checkpoint,
    publish_checkpoint,
    recovery_hint,
)
from .config import TrainConfig, check_model_positions, config_to_dict
from .distributed import init_distributed, launched_world_size
from .mini_batch import MiniBatch, mini_batch_rows, partition_rows, stream_normalizers
from .prompt_stream import PromptStream
from .run_dir import check_resume_config, check_run_dir, move_aside
from .setup import all_synthetic, load_data, load_policy, reference_model, resolve_device
from .shared_prefix import shared_prefix_micro_batches
from .step_metrics import (
    ADDITIVE_LOSS_METRICS,
    UPDATE_METRICS,
    StepMetrics,
    mean_of,
    mean_over_updates,
    truncate_metrics_log,
)

EVAL_SEED_OFFSET = 7_777_777
EVAL_SAMPLES_PER_PROMPT = 4
MAX_HELD_OUT_FAILURES = 64


def step_seed(seed: int, step: int, phase: int) -> int:
    """Sampling seed of one generate call: distinct per (step, phase), identical after a resume."""
    return (seed * 1_000_003 + step * 101 + phase) % (2**31 - 1)


class NonFiniteError(RuntimeError):
    """Training stopped: too many consecutive updates had a non-finite loss or gradient, or the weights are not
    finite. Nothing non-finite was written; the message names the last finite checkpoint."""


class CIPOTrainer:
    """Runs CIPO (or plain GRPO when the correction stream is off) as configured by a :class:`TrainConfig`.

    ``resume``: continue the run in ``trainer.run_dir`` from its latest checkpoint. ``overwrite``: the directory
    may hold another run, which is moved aside first (:mod:`cipo.trainer.run_dir`); without either, a directory
    holding a run is refused.
    """

    def __init__(self, config: TrainConfig, resume: bool = False, overwrite: bool = False) -> None:
        self.cfg = config
        # every key, and the batch's split over this launch's ranks, checked before anything starts
        config.resolve(world_size=launched_world_size())
        self.alg = config.cipo_config()
        self.loss_cfg: PolicyLossConfig = config.actor.loss_config(config.rollout.temperature)
        if self.loss_cfg.loss_agg_mode == "seq-mean-token-sum-norm" and self.loss_cfg.loss_scale_factor is None:
            # Dr.GRPO's constant divisor, as verl's default (the response length): one value for the whole step.
            # The loss's own default (the longest sequence it sees) would differ between micro-batches and ranks.
            self.loss_cfg = dataclasses.replace(self.loss_cfg,
                                                loss_scale_factor=float(config.rollout.max_response_length))
        self.run_dir = Path(config.trainer.run_dir)
        # read-only checks, before anything is loaded or written (every rank sees the same directory)
        check_run_dir(self.run_dir, resume=resume, overwrite=overwrite)
        if resume:
            check_resume_config(self.run_dir, config_to_dict(config))
        self.moved_aside: Optional[Path] = None  # --overwrite: where the old run went
        self.device = resolve_device(config.trainer.device)
        self.dist = init_distributed(self.device.type, required=config.actor.strategy == "deepspeed",
                                     sp_size=config.actor.ulysses_sequence_parallel_size)
        if self.device.type == "cuda" and self.dist.distributed:
            self.device = torch.device("cuda", self.dist.local_rank)
        if overwrite and self.dist.is_main:
            self.moved_aside = move_aside(self.run_dir)
        self.dist.barrier()  # no rank writes before the old run is out of the way
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.nonfinite_streak = 0  # consecutive updates with a non-finite loss or gradient
        if config.trainer.num_threads > 0:
            torch.set_num_threads(config.trainer.num_threads)
        self.step = 0
        torch.manual_seed(config.trainer.seed)

        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if resume and checkpoint is None:  # check_run_dir refused this; the directory changed since
            raise CheckpointError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        self.train_rows, self.val_rows = load_data(config)
        self.model, self.tokenizer, self.init_dir, self.history = load_policy(
            config, self.alg, self.run_dir, self.device, self.dist, self.train_rows, fresh=checkpoint is None)
        check_model_positions(config, getattr(self.model.config, "max_position_embeddings", None))
        # Over-long prompts: counted, refused above data.max_truncated_fraction, dropped with truncation: drop —
        # all before the prompt stream exists, so its indices (and a resume) see the same rows every time.
        self.codec = PromptCodec.from_config(self.tokenizer, config)
        self.train_rows, train_report = screen_prompts(self.train_rows, self.codec.full_ids, config, "training")
        self.val_rows, val_report = screen_prompts(self.val_rows, self.codec.full_ids, config, "held-out")
        self.prompt_report = {"train": train_report, "val": val_report}
        self.truncate = self.codec.truncate  # its count: the prompts cut so far (per-step and summary metrics)
        self.ref_model = reference_model(config, self.loss_cfg, self.model, self.init_dir, self.device)
        self.backend = make_backend(self.model, config, self.dist)
        self.stream = PromptStream(self.train_rows, seed=config.trainer.seed, shuffle=config.data.shuffle)
        self.corrections = CorrectionStream(self.alg, encode=self._encode, decode=self._decode)
        self.scorer = RewardScorer(workers=0 if all_synthetic(config) else 2)
        self.engine = engine_from_config(config, self.init_dir, self.device)
        self.session = RolloutSession(self.engine, self.scorer, self.codec, dist=self.dist)
        if checkpoint is not None:
            self._restore(checkpoint)
            self.engine.update_weights(self.backend.full_named_weights())
        if self.dist.is_main:
            atomic_write_text(self.run_dir / "config.yaml",
                              yaml.safe_dump(config_to_dict(config), sort_keys=False))

    # ------------------------------------------------------------------------------------------- rollouts

    def _prompt_ids(self, messages) -> list[int]:
        """The rendered prompt, cut to ``data.max_prompt_length`` as ``data.truncation`` says (and counted)."""
        return self.codec.prompt_ids(messages)

    def _sample(self, prompts: list[list[int]], rows: list[dict], n: int,
                seed: int) -> tuple[RolloutBatch, list[float]]:
        """``n`` scored completions per prompt at the rollout sampling parameters, for the whole list, on every
        rank (each samples its shard; :func:`cipo.rollout.session.sample_and_score`)."""
        return self.session.sample(prompts, rows, n, sampling_from_config(self.cfg, seed))

    def _groups(self, prompt_ids: list[list[int]], out: RolloutBatch, scores: list[float], *,
                prompt_keys: list[Any]) -> list[RolloutGroup]:
        """One RolloutGroup per prompt of a sampled, scored batch (a correction group's conditioning is set by
        :meth:`CorrectionStream.absorb`)."""
        groups = []
        for i, prompt in enumerate(prompt_ids):
            sl = out.group(i)
            rollouts = [Rollout(response_ids=ids, reward=score, correct=score >= 1.0, rollout_logp=lp)
                        for ids, score, lp in zip(out.token_ids[sl], scores[sl], out.logprobs[sl])]
            groups.append(RolloutGroup(prompt_ids=prompt, rollouts=rollouts, prompt_id=prompt_keys[i]))
        return groups

    # ------------------------------------------------------------------------------------------- the step

    def train_step(self) -> dict[str, float]:
        """One CIPO step; returns its metrics."""
        t0 = time.perf_counter()
        m = StepMetrics()
        base_groups, results = self._base_stream(self.step, m)
        t_base = time.perf_counter()
        corr_groups, regression = self._correction_stream(results, self.step, m)
        m.set(**{"replay/rho": self.corrections.rho})
        t_corr = time.perf_counter()

        batch = assemble_step(base_groups, corr_groups, self.alg, device=self.device)
        advantages = step_advantages(batch, self.alg, regression=regression, estimator=self.cfg.actor.adv_estimator)
        self.engine.sleep()  # vLLM on GPU: hand its memory to the update (wakes on the weight push)
        self._update_policy(batch, advantages, m)
        # tokens through the policy's decoder in this update (all passes) vs the plain packed batches' (shared prefix)
        forwarded, packed = self.dist.all_reduce(list(self.backend.module.pop_token_counts()))
        m.set(**{"batch/tokens_forward": forwarded, "batch/tokens_forward_unshared": packed})
        self.engine.update_weights(self.backend.full_named_weights())
        t_end = time.perf_counter()
        m.set(**{"time/rollout_base": t_base - t0, "time/rollout_corr": t_corr - t_base,
                 "time/update": t_end - t_corr, "time/step": t_end - t0,
                 "batch/tokens": batch.num_tokens, "batch/sequences": batch.num_seqs,
                 "actor/lr": self.backend.lr})
        self.step += 1
        m.set(step=self.step)
        return m.values

    def _base_stream(self, step: int, m: StepMetrics) -> tuple[list[RolloutGroup], list[PromptResult]]:
        """The next prompts, ``rollouts_per_prompt`` scored samples each. Returns the base groups and, per prompt,
        its attempts (what the correction stream records and picks from)."""
        picked = self.stream.next_batch(self.alg.train_batch_size)
        rows = [row for _, row in picked]
        keys = [index for index, _ in picked]
        cut_before = self.truncate.count
        prompt_ids = [self._prompt_ids(row["prompt"]) for row in rows]
        m.set(**{"base/truncated_prompts": self.truncate.count - cut_before})
        base_out, base_scores = self._sample(prompt_ids, rows, self.cfg.rollout.n,
                                             step_seed(self.cfg.trainer.seed, step, 0))
        base_groups = self._groups(prompt_ids, base_out, base_scores, prompt_keys=keys)
        results = [PromptResult(prompt_id=key, prompt=row["prompt"],
                                trajectories=[Trajectory(correct=r.correct, text=text) for r, text in
                                              zip(group.rollouts, base_out.texts[base_out.group(i)])])
                   for i, (key, row, group) in enumerate(zip(keys, rows, base_groups))]
        m.set(**{"base/reward": mean_of(base_scores), "base/accuracy": mean_of([s >= 1.0 for s in base_scores]),
                 "base/response_length": mean_of([len(t) for t in base_out.token_ids]),
                 "rollout/response_tokens_base": float(sum(len(t) for t in base_out.token_ids))})
        return base_groups, results

    def _correction_stream(self, results: list[PromptResult], step: int,
                           m: StepMetrics) -> tuple[list[RolloutGroup], Optional[list[bool]]]:
        """The correction stream of a step (docs/DESIGN.md §2): :class:`CorrectionStream` records the base results
        and proposes correction prompts (selector, ρ, template); they are sampled ``correction_rollouts`` times each
        and scored here, and the stream absorbs the groups (shaping, replay controller). Returns the shaped
        correction groups and their regression flags for the advantages (``[]`` and None when the stream is off
        or picks nothing)."""
        proposal = self.corrections.propose(results, step)  # also records the pass rates when the stream is off
        m.update("", proposal.metrics)
        if not proposal.picks:
            return [], None
        cut_before = self.truncate.count
        corr_ids = [self._prompt_ids(p.messages) for p in proposal.prompts]
        m.set(**{"corr/truncated_prompts": self.truncate.count - cut_before})
        corr_rows = [self.train_rows[p.prompt_id] for p in proposal.picks]  # prompt ids index the set
        corr_out, corr_scores = self._sample(corr_ids, corr_rows, self.alg.correction_rollouts,
                                             step_seed(self.cfg.trainer.seed, step, 1))
        corr_groups = self._groups(corr_ids, corr_out, corr_scores, prompt_keys=[p.prompt_id for p in proposal.picks])
        outcome = self.corrections.absorb(proposal, corr_groups)
        m.update("", outcome.metrics())
        m.set(**{"corr/success": mean_of([s >= 1.0 for s in corr_scores]),
                 "corr/prompt_length": mean_of([len(p) for p in corr_ids]),
                 "corr/response_length": mean_of([len(t) for t in corr_out.token_ids]),
                 "rollout/response_tokens_corr": float(sum(len(t) for t in corr_out.token_ids))})
        return outcome.groups, outcome.regression

    def _update_policy(self, batch: PackedBatch, advantages: torch.Tensor, m: StepMetrics) -> None:
        """``ppo_epochs`` passes over the step's mini-batches (:func:`mini_batch_rows`; one mini-batch, the whole
        step, unless ``actor.ppo_mini_batch_size`` is set), one optimizer step per mini-batch.

        Each mini-batch is split over the ranks by whole groups and micro-batched by token budget; its loss is
        normalised over the mini-batch (global per-stream token or sequence counts), so the ranks' and
        micro-batches' gradients sum to the gradient of that mini-batch's loss, as in verl. With more than one
        optimizer step per step, the old log-probs of every mini-batch come from one no-grad trainer forward
        before the first step, so the later steps' ratios, clipping and truncated-IS weights are measured against
        the policy that collected the batch. The step's metrics are means over the updates; with several updates
        ``actor/last/*`` holds the last update's per-token means (clip fractions, ``approx_kl``)."""
        actor = self.cfg.actor
        plans = []
        for rows in mini_batch_rows(batch, actor.ppo_mini_batch_size):
            normalizers = stream_normalizers(batch.select(rows), self.loss_cfg.loss_agg_mode)
            owned = self._owned_rows(batch, rows)
            local = batch.select(owned)
            plans.append(MiniBatch(local, advantages[owned], self._micro_batches(local), normalizers))
        updates = actor.ppo_epochs * len(plans)
        for plan in plans:  # all before the first update
            if updates > 1:
                plan.local.old_logp = self._logp(self.backend.forward, plan.local, plan.micro)
            else:
                plan.local.old_logp = None  # on-policy: the loss uses its own log-probs, detached (ratio exactly 1)
            if self.ref_model is not None:
                plan.local.ref_logp = self._logp(self.ref_model, plan.local, plan.micro)
        per_update = [self._optimizer_step(plan) for _ in range(actor.ppo_epochs) for plan in plans]
        m.set(**mean_over_updates(per_update))
        # a count, not a mean: how many of the step's updates were skipped
        m.set(**{"actor/skipped_nonfinite": sum(u["actor/skipped_nonfinite"] for u in per_update)})
        if len(per_update) > 1:
            last = {f"actor/last/{name[len('actor/'):]}": value for name, value in per_update[-1].items()
                    if name[len("actor/"):] not in ADDITIVE_LOSS_METRICS | UPDATE_METRICS}
            m.set(**{"actor/updates": len(per_update)}, **last)

    def _optimizer_step(self, plan: MiniBatch) -> dict[str, float]:
        """One optimizer step on this rank's part of a mini-batch; returns the update's metrics over all ranks."""
        actor = self.cfg.actor
        kwargs = dict(fused=actor.fused_loss, lambda_corr=self.alg.lambda_corr, base_normalizer=plan.normalizers[0],
                      corr_normalizer=plan.normalizers[1])
        sp = self.backend.sequence_parallel
        self.backend.zero_grad()
        part, total = StepMetrics(), 0.0
        for k, rows in enumerate(plan.micro):
            sub_rows = rows if rows is not None else [0]
            sub = plan.local.select(sub_rows)
            # Ulysses SP: the group forwards the micro-batch together and splits its sequences for the loss
            loss_rows = sp.loss_rows(sub) if sp is not None else None
            loss, metrics = self.backend.forward(sub, self.loss_cfg, advantages=plan.advantages[sub_rows],
                                                 loss_rows=loss_rows, **kwargs)
            if rows is None:
                loss = loss * 0.0  # a padding micro-batch: keeps ZeRO's collectives in step, adds nothing
            self.backend.backward(loss, last=k == len(plan.micro) - 1)
            if rows is not None and metrics:
                total += float(loss.detach())
                own = sub if loss_rows is None else sub.select(loss_rows)
                part.add_loss_metrics(metrics, weight=float(own.loss_mask.sum()))
        # A non-finite loss or gradient skips the update: one NaN row makes the whole LM-head gradient NaN, and
        # an applied step would carry it into every later checkpoint. The torch backend tests the gradient norm
        # that clipping computes anyway (one fused reduction); DeepSpeed tests the global norm itself.
        grad_norm, applied = self.backend.step(skip=not math.isfinite(total))
        update = StepMetrics()
        update.merge_loss_parts(self.dist.all_gather_object(part.loss_part()))
        loss_sum, padding = self.dist.all_reduce([total, plan.micro.count(None)])
        # padding: micro-batches run only to keep the ranks in step (0 on one rank; a load-imbalance gauge)
        update.set(**{"actor/loss": loss_sum, "actor/grad_norm": grad_norm, "actor/padding_micro_batches": padding,
                      "actor/skipped_nonfinite": float(not applied)})
        self._count_nonfinite(loss_sum, grad_norm, applied)
        return update.values

    def _count_nonfinite(self, loss: float, grad_norm: float, applied: bool) -> None:
        """Track consecutive non-finite updates; stop after ``actor.max_consecutive_nonfinite``.

        Every input is the same on every rank (the all-reduced loss, the global gradient norm, DeepSpeed's
        all-reduced overflow decision), so every rank counts, and stops, identically."""
        finite = applied and math.isfinite(loss) and math.isfinite(grad_norm)
        if applied and not math.isfinite(grad_norm):
            # only DeepSpeed decides this itself; a config that turns its overflow check off gets here
            raise NonFiniteError(f"step {self.step + 1}: an update with a non-finite gradient norm ({grad_norm}) was "
                                 "applied (is DeepSpeed's check_grad_overflow / compute_grad_norm off?); the weights "
                                 f"are not finite and are not saved. {self._last_checkpoint_note()}")
        self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
        limit = self.cfg.actor.max_consecutive_nonfinite
        if self.nonfinite_streak >= limit:
            raise NonFiniteError(
                f"step {self.step + 1}: {self.nonfinite_streak} consecutive updates had a non-finite loss or gradient "
                f"(last: loss {loss}, gradient norm {grad_norm}; actor.max_consecutive_nonfinite={limit}); they were "
                "skipped, so the weights are finite, but training cannot go on. Look for NaN/inf in the data, "
                f"rewards or advantages, or lower actor.lr. {self._last_checkpoint_note()}")

    def _last_checkpoint_note(self) -> str:
        try:
            latest = latest_checkpoint(self.run_dir)
        except CheckpointError:
            latest = None
        if latest is None:
            return "No checkpoint was written yet."
        return f"The last checkpoint is {latest} (resume it with --resume after fixing the cause)."

    def _check_weights_finite(self, what: str) -> None:
        """Refuse to write ``what`` (a checkpoint, the HF export) from non-finite weights: one fused fp32 norm per
        device over this rank's weights (its ZeRO-3 partitions), the verdict reduced over the ranks."""
        local = [getattr(p, "ds_tensor", p).detach() for p in self.model.parameters()]
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for tensor in local:
            if tensor.numel():
                by_device.setdefault(tensor.device, []).append(tensor)
        local_ok = all(bool(torch.isfinite(torch.stack(torch._foreach_norm(group, 2, dtype=torch.float32))).all())
                       for group in by_device.values())
        if self.dist.all_reduce([0.0 if local_ok else 1.0], op="max")[0] == 0.0:
            return
        bad = next((name for name, p in self.model.named_parameters()
                    if not bool(torch.isfinite(getattr(p, "ds_tensor", p)).all())), "a partition on another rank")
        raise NonFiniteError(f"step {self.step}: the weights are not finite ({bad}); {what} was not written. "
                             f"{self._last_checkpoint_note()}")

    def _owned_rows(self, batch: PackedBatch, rows: Optional[Sequence[int]] = None) -> list[int]:
        """The sequences of ``rows`` (default: all) this rank trains on: whole groups, balanced by tokens over the
        data-parallel ranks (all of them on one rank; the same for every rank of a sequence-parallel group)."""
        rows = list(range(batch.num_seqs)) if rows is None else list(rows)
        if self.dist.dp_size == 1:
            return rows
        return partition_rows(batch, rows, self.dist.dp_size)[self.dist.dp_rank]

    def _micro_batches(self, local: PackedBatch) -> list[Optional[list[int]]]:
        """The local batch's micro-batches by token budget, padded with ``None`` to the largest count over the
        ranks: ZeRO gathers weights and reduces gradients inside forward/backward, so every rank runs as many."""
        budget = self.cfg.actor.micro_batch_tokens
        split = shared_prefix_micro_batches(local, budget) if self.cfg.actor.shared_prefix else \
            local.micro_batches(budget)  # shared prefix: the budget counts the tokens the forward processes
        micro: list[Optional[list[int]]] = list(split)
        count = int(self.dist.all_reduce([len(micro)], op="max")[0])
        return micro + [None] * (count - len(micro))

    @torch.no_grad()
    def _logp(self, forward, batch: PackedBatch, micro: list[Optional[list[int]]]) -> torch.Tensor:
        """``[N]`` float32 log-probs of ``batch``'s targets under ``forward`` (a policy module or backend; 0
        where there is no target), over the given (padded) micro-batches."""
        out = torch.zeros(batch.num_tokens, dtype=torch.float32, device=self.device)
        for rows in micro:
            logp = forward(batch.select(rows if rows is not None else [0]), self.loss_cfg, logp_only=True)
            if rows is None:
                continue
            out[batch.token_index(rows)] = logp.float()
        return out

    # ------------------------------------------------------------------------------------------- evaluation

    def _encode(self, text: str) -> list[int]:
        return self.codec.encode(text)

    def _decode(self, ids: list[int]) -> str:
        return self.codec.decode(ids)

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy (``EVAL_SAMPLES_PER_PROMPT`` samples per prompt at the rollout temperature) and
        correction success (as many samples per failure) on a fixed set of held-out failures, collected by the
        first evaluation — the same failures before and after training, so the two numbers compare.

        Sampled through the rollout session's rows and correction-prompt paths, the ones ``cipo eval``
        (:func:`cipo.evaluation.evaluate_run`) takes."""
        rows = self.val_rows[: self.cfg.trainer.eval_prompts]
        if not rows:
            return {}
        seed = step_seed(self.cfg.trainer.seed + EVAL_SEED_OFFSET, 0, 0)
        out, scores = self.session.sample_rows(rows, EVAL_SAMPLES_PER_PROMPT, sampling_from_config(self.cfg, seed))
        result = {"eval/accuracy": mean_of([s >= 1.0 for s in scores])}
        if "held_out_failures" not in self.history:
            failures = [(k // out.n, out.texts[k]) for k, s in enumerate(scores) if s < 1.0]
            self.history["held_out_failures"] = failures[:MAX_HELD_OUT_FAILURES]
        failures = self.history["held_out_failures"]
        if failures:
            _, corr_scores = self.session.sample_corrections(self.alg.template, rows, failures,
                                                             EVAL_SAMPLES_PER_PROMPT,
                                                             sampling_from_config(self.cfg, seed + 1),
                                                             correct=[False] * len(failures))
            result["eval/correction_success"] = mean_of([s >= 1.0 for s in corr_scores])
        return result

    # ------------------------------------------------------------------------------------------- the loop

    def train(self) -> dict[str, Any]:
        """Train ``trainer.total_steps`` steps (from where a resumed run stopped); write metrics, plot, summary."""
        from tqdm.auto import tqdm

        tcfg = self.cfg.trainer
        main = self.dist.is_main
        metrics_path = self.run_dir / "metrics.jsonl"
        if main:
            truncate_metrics_log(metrics_path, self.step)
        started = time.perf_counter()
        if "eval_before" not in self.history:
            self.history["eval_before"] = self.evaluate()
        bar = tqdm(total=tcfg.total_steps, initial=self.step, desc="cipo", disable=not (tcfg.progress and main),
                   dynamic_ncols=True)
        while self.step < tcfg.total_steps:
            metrics = self.train_step()
            if tcfg.eval_every and self.step % tcfg.eval_every == 0 and self.step < tcfg.total_steps:
                metrics.update(self.evaluate())
            if main:
                with metrics_path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(metrics, sort_keys=True) + "\n")
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['base/reward']:.2f}", acc=f"{metrics['base/accuracy']:.2f}",
                            corr=f"{metrics.get('corr/success', float('nan')):.2f}",
                            rho=f"{metrics['replay/rho']:.2f}")
            if tcfg.save_every and self.step % tcfg.save_every == 0:
                self.save()
        bar.close()
        self.history["eval_after"] = self.evaluate()
        summary = self._summary(time.perf_counter() - started)
        if tcfg.save_hf_model:
            self._check_weights_finite(f"{self.run_dir / 'hf_model'}")
            export_hf(self.backend, self.tokenizer, self.run_dir / "hf_model", self.dist)
        if main:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
            from .plots import plot_curves

            plot_curves(metrics_path, self.run_dir / "curves.png", summary)
        return summary

    def _summary(self, seconds: float) -> dict[str, Any]:
        before, after = self.history.get("eval_before", {}), self.history.get("eval_after", {})
        return {
            "steps": self.step,
            "train_seconds": seconds,
            "eval_accuracy_before": before.get("eval/accuracy"),
            "eval_accuracy_after": after.get("eval/accuracy"),
            "correction_success_before": before.get("eval/correction_success"),
            "correction_success_after": after.get("eval/correction_success"),
            "held_out_prompts": min(len(self.val_rows), self.cfg.trainer.eval_prompts),
            "held_out_failures": len(self.history.get("held_out_failures", [])),
            # prompts over data.max_prompt_length per split (cut or dropped), and those cut during training
            "prompts_over_limit": {"train": self.prompt_report["train"]["over_limit"],
                                   "val": self.prompt_report["val"]["over_limit"],
                                   "cut_in_training": self.truncate.count},
            "warmstart": self.history.get("warmstart"),
            "rollout_engine": type(self.engine).__name__,
            "world_size": self.dist.world_size,
            "sequence_parallel_size": self.dist.sp_size,
        }

    # ------------------------------------------------------------------------------------------- checkpoints

    def save(self) -> Path:
        """Checkpoint the step (every rank calls it); ``latest`` moves once the whole checkpoint is written."""
        client_state = {
            "step": self.step,
            "stream": self.stream.state_dict(),
            **self.corrections.state_dict(),  # "tracker", "controller", "pool"
            "history": self.history,
            "config": config_to_dict(self.cfg),
        }
        self._check_weights_finite(f"the checkpoint of step {self.step}")
        path = self.backend.save(checkpoint_path(self.run_dir, self.step), client_state)
        if self.dist.is_main:
            publish_checkpoint(path, keep=self.cfg.trainer.keep_checkpoints)
        self.dist.barrier()
        return path

    def _restore(self, path: Path) -> None:
        try:
            state = self.backend.load(path)  # refuses a checkpoint another world size wrote
        except (CheckpointError, FileNotFoundError):
            raise
        except (RuntimeError, ValueError, KeyError) as exc:
            # e.g. load_state_dict's size-mismatch list (dozens of lines): its first lines say enough
            lines = str(exc).strip().splitlines()
            reason = " ".join(line.strip() for line in lines[:3]) + (f" (+{len(lines) - 3} more lines)"
                                                                       if len(lines) > 3 else "")
            raise CheckpointError(f"cannot resume from {path}: {type(exc).__name__}: {reason}; does the model "
                                  f"match the one the run was started with? {recovery_hint(path.parent, path)}"
                                  ) from exc
        self.stream.load_state_dict(state["stream"])
        self.corrections.load_state_dict(state)
        self.history = state["history"]
        self.step = int(state["step"])

    def close(self) -> None:
        self.engine.close()
        self.scorer.close()
        if self.dist.distributed and torch.distributed.is_initialized():
            self.dist.barrier()
            torch.distributed.destroy_process_group()
