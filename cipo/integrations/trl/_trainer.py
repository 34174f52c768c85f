"""``CipoGRPOTrainer``: TRL 1.16's ``GRPOTrainer`` with cipo's fused LM head and, optionally, cipo's policy loss."""

from __future__ import annotations

from typing import Any, Optional

import torch
from trl import GRPOTrainer

from cipo.loss import policy_loss

from ._head import add_cipo_fused_lm_head
from ._loss import trl_loss_config, trl_loss_normalizer

# Per-sample inputs that TRL's _get_per_token_logps_and_entropies forwards to multimodal models.
_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                 "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)  # PEFT: patch the model under the adapter
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


class CipoGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with cipo's kernels; every other behaviour (generation, rewards, advantages, logging,
    checkpoints) is TRL's own.

    Args:
        *args, **kwargs: those of ``trl.GRPOTrainer``.
        cipo_lm_head: compute the per-token log-probs and entropies of the policy (and of the reference model) with
            :func:`cipo.linear_logprob` through TRL's ``fused_lm_head`` contract (:func:`add_cipo_fused_lm_head`).
        cipo_loss: compute the policy loss with :func:`cipo.policy_loss` instead of TRL's, under the mapping of
            docs/integrations/trl.md; configs without an equivalent raise a ``ValueError`` at construction.
    """

    def __init__(self, *args: Any, cipo_lm_head: bool = True, cipo_loss: bool = False, **kwargs: Any) -> None:
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if cipo_loss and config is not None:
            trl_loss_config(config)  # refuse before any model is loaded
        super().__init__(*args, **kwargs)
        self.cipo_lm_head = bool(cipo_lm_head)
        self.cipo_loss = bool(cipo_loss)
        self._cipo_loss_config = trl_loss_config(self.args) if self.cipo_loss else None
        if self.cipo_loss and self.aux_loss_enabled:
            raise ValueError("CipoGRPOTrainer(cipo_loss=True): the MoE load-balancing loss (router_aux_loss_coef != 0 "
                             "on an MoE model) is not covered; keep TRL's loss (cipo_loss=False)")
        if self.cipo_lm_head:
            # Wraps the forward TRL patched: plain calls still reach it (and the model's own forward) unchanged.
            add_cipo_fused_lm_head(_base_model(self.accelerator.unwrap_model(self.model)),
                                   temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
                                   outputs=("log_probs", "entropy"))
            if self.ref_model is not None:
                add_cipo_fused_lm_head(self.accelerator.unwrap_model(self.ref_model), temperature=self.temperature,
                                       cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)

    # ------------------------------------------------------------------------------------------------ the loss

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        if not self.cipo_loss:
            return super()._compute_loss(model, inputs)
        train = self.model.training
        mode = "train" if train else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            **{key: inputs.get(key) for key in _FORWARD_KEYS},
        )
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old

        # TRL multiplies the policy term (not the KL) by these; cipo takes their product as is_weights.
        weights: list[torch.Tensor] = []
        entropy_mask: Optional[torch.Tensor] = None
        if self.off_policy_mask_threshold is not None:
            weights.append(self.get_off_policy_mask(
                advantages=advantages, per_token_logps=logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old), mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            ))
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
            weights.append(entropy_mask)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights.append(inputs["importance_sampling_ratio"])
        is_weights = None
        if weights:
            is_weights = torch.ones_like(logps)
            for w in weights:
                is_weights = is_weights * w.to(logps.dtype)

        loss, metrics = self._cipo_policy_loss(logps, old, advantages.expand_as(logps), mask.bool(), is_weights,
                                               inputs, train)

        if self._entropy_bonus_enabled:
            # TRL's bonus: a token mean of the entropy over the tokens the policy term acts on, ÷ GA, any loss_type
            effective = mask if entropy_mask is None else mask * entropy_mask
            ga = self.current_gradient_accumulation_steps if train else 1
            bonus = (entropies * effective).sum() / effective.sum().clamp(min=1.0) / ga
            policy_part = loss.detach() if self.loss_type == "dapo" else loss.detach() * ga  # TRL's metric
            loss = loss - self.entropy_coef * bonus
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_part).nanmean().item())
            if train and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

        self._log_cipo_metrics(mode, logps, old, advantages, mask, entropies, inputs, metrics)
        return loss

    def _normalizer(self, mask: torch.Tensor, num_items_in_batch: float, train: bool) -> float:
        return trl_loss_normalizer(
            self.loss_type, batch_size=mask.size(0), num_tokens=float(mask.sum()),
            num_items_in_batch=float(num_items_in_batch), max_completion_length=self.max_completion_length,
            grad_accum=self.current_gradient_accumulation_steps, steps_per_generation=self.args.steps_per_generation,
            num_processes=self.accelerator.num_processes, train=train,
        )

    def _cipo_policy_loss(self, logps: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                          is_weights: Optional[torch.Tensor], inputs: dict[str, Any], train: bool
                          ) -> tuple[torch.Tensor, dict[str, float]]:
        """:func:`cipo.policy_loss` over the micro-batch, normalised as TRL's ``loss_type`` does."""
        return policy_loss(
            logps, old, advantages, mask, self._cipo_loss_config,
            ref_logp=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            loss_normalizer=self._normalizer(mask, inputs["num_items_in_batch"], train), is_weights=is_weights,
        )

    def _log_cipo_metrics(self, mode: str, logps: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor,
                          mask: torch.Tensor, entropies: torch.Tensor, inputs: dict[str, Any],
                          metrics: dict[str, float]) -> None:
        """TRL's metric names (global token means over processes) plus cipo's own under ``cipo/``."""
        m = mask.to(torch.float32)

        def global_mean(values: torch.Tensor) -> float:
            totals = torch.stack([(values.detach().float() * m).sum(), m.sum()])
            totals = self.accelerator.reduce(totals, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        self._metrics[mode]["entropy"].append(global_mean(entropies))
        if self.beta != 0.0:
            diff = inputs["ref_per_token_logps"] - logps.detach()
            self._metrics[mode]["kl"].append(global_mean(torch.exp(diff) - diff - 1))
        ratio = torch.exp(logps.detach() - old)
        low = (ratio < 1 - self.epsilon_low) & (advantages < 0)
        high = (ratio > 1 + self.epsilon_high) & (advantages > 0)
        self._metrics[mode]["clip_ratio/low_mean"].append(global_mean(low))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_mean(high))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_mean(low | high))
        for key in ("clipfrac", "clipfrac_lower", "approx_kl"):
            self._metrics[mode][f"cipo/{key}"].append(metrics[key])
