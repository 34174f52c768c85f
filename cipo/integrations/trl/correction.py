"""CIPO's correction stream inside TRL 1.16's ``GRPOTrainer``: :class:`CipoCorrectionGRPOTrainer`.

Each generation batch, after TRL has sampled, scored and normalised the base stream (its own code, untouched), the
run's :class:`~cipo.algorithm.CorrectionStream` (the same object :class:`cipo.trainer.trainer.CIPOTrainer` drives):

1. ``propose``: the base completions' rewards (``≥ correct_threshold`` = correct) update the pass rates; the
   difficulty selector picks ``correction_batch_size`` conditioning trajectories, ``round(ρ·B)`` of them successful,
   preferring prompts whose pass rate lies in ``[p_low, p_high]``; the template turns each (prompt, attempt) into a
   correction prompt (no ground truth, no verdict);
2. TRL's own generation + reward functions produce ``num_generations`` refinements of each correction prompt;
3. ``absorb``: risk-averse shaping (``r − α`` or ``A − α`` on correct → incorrect regressions) and the replay
   controller's update from the retention; GRPO advantages within each correction group
   (:meth:`~cipo.algorithm.CorrectionOutcome.advantages`);
4. base and correction sequences are trained together: ``L = L_base + λ·L_corr``, each stream normalised by its own
   token count over the generation batch (TRL's ``dapo`` normaliser, per stream), with cipo's policy loss.

With ``correction_batch_size=0`` (or ``lambda_corr=0``, or no picks) the loss is ``CipoGRPOTrainer(cipo_loss=True)``'s,
i.e. TRL's ``dapo`` loss. Scope: one process, text prompts (plain or conversational), no tools, no vLLM; the base
stream keeps TRL's advantages (``scale_rewards`` etc.), the correction stream uses cipo's (docs/DESIGN.md §4).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Optional

import torch

from cipo.algorithm import CIPOConfig, CorrectionStream, PromptResult, Rollout, RolloutGroup, Trajectory
from cipo.loss import policy_loss

from ._trainer import CipoGRPOTrainer

STREAM_KEY = "cipo_stream"  # per-sequence 0 (base) / 1 (correction) in the generation batch
CORR_ITEMS_KEY = "cipo_num_items_corr"  # loss tokens of the correction stream in the generation batch


class CipoCorrectionGRPOTrainer(CipoGRPOTrainer):
    """``GRPOTrainer`` + CIPO's correction stream, built by :mod:`cipo.algorithm` (docs/integrations/trl.md).

    Args:
        *args, **kwargs: those of ``trl.GRPOTrainer`` (and ``cipo_lm_head`` of :class:`CipoGRPOTrainer`);
            ``args.loss_type`` must be ``"dapo"`` (TRL's default).
        cipo_config: the CIPO knobs (:class:`~cipo.CIPOConfig`): ``correction_batch_size``, ``lambda_corr``,
            ``alpha``, ``shaping_target``, ``p_low``/``p_high``, ρ controller, template, ``seed``.
            ``correction_rollouts`` must equal ``args.num_generations`` (TRL samples that many per prompt);
            ``train_batch_size``/``rollouts_per_prompt`` are TRL's and ignored.
        correct_threshold: a completion whose weighted total reward reaches it counts as correct.
        prompt_key: dataset column holding a stable prompt id (int or str); by default the prompt's JSON text.
    """

    def __init__(self, *args: Any, cipo_config: Optional[CIPOConfig] = None, correct_threshold: float = 1.0,
                 prompt_key: Optional[str] = None, **kwargs: Any) -> None:
        kwargs["cipo_loss"] = True
        super().__init__(*args, **kwargs)
        cfg = cipo_config if cipo_config is not None else CIPOConfig(correction_rollouts=self.num_generations)
        problems = []
        if self.loss_type != "dapo":
            problems.append(f"loss_type={self.loss_type!r} (the two streams are normalised by their own token "
                            "counts over the generation batch, TRL's 'dapo' normaliser; use loss_type='dapo')")
        if cfg.correction_rollouts != self.num_generations:
            problems.append(f"cipo_config.correction_rollouts={cfg.correction_rollouts} != num_generations="
                            f"{self.num_generations} (TRL samples num_generations per prompt)")
        if self.accelerator.num_processes > 1:
            problems.append(f"{self.accelerator.num_processes} processes (the correction stream runs on one)")
        if self.use_vllm or self.tools or self.environment_factories is not None or self.rollout_func is not None:
            problems.append("vLLM generation, tools, environments or a rollout_func (not covered)")
        if problems:
            raise ValueError("CipoCorrectionGRPOTrainer: unsupported setting(s): " + "; ".join(problems))
        self.cipo_config = cfg
        self.correct_threshold = float(correct_threshold)
        self.prompt_key = prompt_key
        tok = self.processing_class
        self.correction_stream = CorrectionStream(
            cfg, encode=lambda text: tok(text, add_special_tokens=False)["input_ids"],
            decode=lambda ids: tok.decode(ids, skip_special_tokens=True))
        self._cipo_step = 0
        self._rows: dict[Any, dict] = {}
        self._last_rewards: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------------------------ rollouts

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        weights = self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
        self._last_rewards = (rewards_per_func * weights).nansum(dim=1).detach().cpu()
        self._last_completions = list(completions)
        return rewards_per_func

    def _prompt_id(self, row: dict) -> Any:
        if self.prompt_key is not None:
            return row[self.prompt_key]
        return json.dumps(row["prompt"], sort_keys=True)

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict[str, Any]:
        base = super()._generate_and_score_completions(inputs)
        base[STREAM_KEY] = torch.zeros(base["completion_ids"].size(0), dtype=torch.long)
        base[CORR_ITEMS_KEY] = torch.zeros((), dtype=base["num_items_in_batch"].dtype)
        cfg = self.cipo_config
        if not self.model.training or not cfg.correction_active:
            return base
        step = self._cipo_step
        self._cipo_step += 1
        G = self.num_generations
        rewards, texts = self._last_rewards, self._last_completions
        results = []
        for g in range(len(inputs) // G):
            row = inputs[g * G]
            pid = self._prompt_id(row)
            self._rows[pid] = row
            trajectories = [Trajectory(correct=bool(rewards[g * G + k] >= self.correct_threshold),
                                       text=_as_text(texts[g * G + k])) for k in range(G)]
            results.append(PromptResult(prompt_id=pid, prompt=row["prompt"], trajectories=trajectories))
        proposal = self.correction_stream.propose(results, step)
        metrics: dict[str, float] = dict(proposal.metrics)
        # TRL splits the generation batch into steps_per_generation equal micro-batches
        spg = self.args.steps_per_generation
        keep = len(proposal)
        while keep and (keep * G + base["completion_ids"].size(0)) % spg:
            keep -= 1
        proposal = proposal.head(keep)
        metrics["replay/rho"] = self.correction_stream.rho
        if not proposal.picks:
            self._log_dict(metrics)
            return base
        corr_inputs = []
        for pick, prompt in zip(proposal.picks, proposal.prompts):
            row = dict(self._rows[pick.prompt_id])
            row["prompt"] = prompt.messages if isinstance(row["prompt"], list) else prompt.text
            corr_inputs.extend(dict(row) for _ in range(G))

        # TRL's own sampling, rewards and old/ref log-probs for the correction prompts; its metrics go to corr/*
        before = {key: len(values) for key, values in self._metrics["train"].items()}
        corr = super()._generate_and_score_completions(corr_inputs)
        moved = defaultdict(list)
        for key, values in list(self._metrics["train"].items()):
            start = before.get(key, 0)
            if len(values) > start:
                moved[f"corr/{key}"].extend(values[start:])
                del values[start:]
        for key, values in moved.items():
            self._metrics["train"][key].extend(values)

        corr_rewards = self._last_rewards
        groups = [RolloutGroup(prompt_ids=[], prompt_id=pick.prompt_id,
                               rollouts=[Rollout(response_ids=[], reward=float(corr_rewards[i * G + k]),
                                                 correct=bool(corr_rewards[i * G + k] >= self.correct_threshold))
                                         for k in range(G)])
                  for i, pick in enumerate(proposal.picks)]
        outcome = self.correction_stream.absorb(proposal, groups)
        # float64, as this trainer always computed them; float32 would match CIPOTrainer's bit for bit but move
        # some values by one float32 ulp (see CorrectionOutcome.advantages)
        advantages = outcome.advantages(cfg, estimator="grpo", dtype=torch.float64)
        corr["advantages"] = advantages.to(base["advantages"].dtype).to(base["advantages"].device)
        metrics.update(outcome.metrics())
        metrics["corr/success"] = float((corr_rewards >= self.correct_threshold).float().mean())
        metrics["corr/num_sequences"] = float(len(proposal) * G)
        self._log_dict(metrics)
        merged = _concat(base, corr, pad_token_id=self.processing_class.pad_token_id)
        merged[STREAM_KEY] = torch.cat([base[STREAM_KEY], torch.ones(len(proposal) * G, dtype=torch.long)])
        merged[CORR_ITEMS_KEY] = corr["num_items_in_batch"].to(base["num_items_in_batch"].dtype)
        return merged

    def _log_dict(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._metrics["train"][f"cipo/{key}"].append(float(value))

    # ------------------------------------------------------------------------------------ loss

    def _cipo_policy_loss(self, logps, old, advantages, mask, is_weights, inputs, train):
        stream = inputs.get(STREAM_KEY)
        if stream is None:  # evaluation: the base stream only
            return super()._cipo_policy_loss(logps, old, advantages, mask, is_weights, inputs, train)
        corr_rows = (stream == 1).to(mask.device).unsqueeze(1)
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        total, metrics = None, {}
        for name, part_mask, items, weight in (
                ("base", mask & ~corr_rows, inputs["num_items_in_batch"], 1.0),
                ("corr", mask & corr_rows, inputs[CORR_ITEMS_KEY], self.cipo_config.lambda_corr)):
            loss, part = policy_loss(logps, old, advantages, part_mask, self._cipo_loss_config, ref_logp=ref,
                                     loss_normalizer=self._normalizer(part_mask, items, train), is_weights=is_weights)
            total = loss * weight if total is None else total + loss * weight
            metrics = part if name == "base" else metrics
            self._metrics["train" if train else "eval"][f"cipo/loss/{name}"].append(float(loss.detach()))
        return total, metrics


def _as_text(completion: Any) -> str:
    """A completion as TRL hands it to reward functions: a string, or a list of chat messages."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") if isinstance(m.get("content"), str) else "" for m in completion)


def _pad_to(t: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    extra = width - t.size(1)
    if extra <= 0:
        return t
    pad = torch.full((t.size(0), extra), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def _concat(base: dict[str, Any], corr: dict[str, Any], pad_token_id: int) -> dict[str, Any]:
    """Stack two generation batches: prompts left-padded, completions (and per-token values) right-padded."""
    out = dict(base)
    P = max(base["prompt_ids"].size(1), corr["prompt_ids"].size(1))
    C = max(base["completion_ids"].size(1), corr["completion_ids"].size(1))
    specs = {"prompt_ids": (P, pad_token_id, True), "prompt_mask": (P, 0, True),
             "completion_ids": (C, pad_token_id, False), "completion_mask": (C, 0, False),
             "old_per_token_logps": (C, 0.0, False), "ref_per_token_logps": (C, 0.0, False)}
    for key, (width, value, left) in specs.items():
        if key in base or key in corr:
            if (key in base) != (key in corr):
                raise RuntimeError(f"{key} is in one stream's batch and not the other's")
            out[key] = torch.cat([_pad_to(base[key], width, value, left), _pad_to(corr[key], width, value, left)])
    out["advantages"] = torch.cat([base["advantages"], corr["advantages"]])
    return out
