"""TRL 1.16 ``GRPOConfig`` → cipo's :class:`~cipo.PolicyLossConfig` and normaliser (docs/integrations/trl.md).

TRL's ``GRPOTrainer._compute_loss`` builds a per-token loss ``-min(ρA, clip(ρ)A)`` (``ρ`` clamped above at ``delta``
when set), multiplies it by the off-policy mask, the high-entropy mask and vLLM's importance weights, adds
``β·k3`` and divides the masked sum by a ``loss_type``-specific normaliser that already contains the gradient
accumulation. cipo's :func:`~cipo.policy_loss` computes the same quantity when

* ``epsilon``/``epsilon_high`` → ``clip_ratio_low``/``clip_ratio_high``; ``delta`` → dual-clip ``clip_ratio_c``
  (identical whenever ``delta ≥ 1 + epsilon_high``; smaller values are refused);
* the three multiplicative masks/weights → ``is_weights`` (they scale the policy term only, as in TRL);
* ``beta`` → ``kl_coef`` with ``kl_type="low_var_kl"`` (k3), only with ``use_bias_correction_kl=False``;
* ``loss_type`` → an aggregation mode plus ``loss_normalizer`` (:func:`trl_loss_normalizer`).

Nothing here imports TRL: ``args`` is any object with ``GRPOConfig``'s attribute names.
"""

from __future__ import annotations

from typing import Any

from cipo.config import PolicyLossConfig

#: loss_type → cipo aggregation mode. The normaliser (``loss_normalizer=``) carries TRL's denominators.
LOSS_AGG_MODES = {
    "grpo": "seq-mean-token-mean",  # Σ_seq (Σ_t ℓm / Σ_t m) / (B · GA)
    "bnpo": "token-mean",           # Σ ℓm / (Σ m · GA), local micro-batch tokens
    "dr_grpo": "token-mean",        # Σ ℓm / (B · max_completion_length · GA)
    "dapo": "token-mean",           # Σ ℓm / (num_items_in_batch / P · GA / steps_per_generation)
    "luspo": "seq-mean-token-sum",  # Σ_seq Σ_t ℓm / (B · GA)
}

#: loss_types with no cipo equivalent, and why.
REFUSED_LOSS_TYPES = {
    "cispo": "CISPO's surrogate -clamp(ρ, max=ε_high).detach()·A·logp is not cipo's clipped ratio loss",
    "sapo": "SAPO's soft sigmoid gate replaces the clip; cipo has only the hard clip",
    "vespo": "VESPO's sequence-level Gamma weights are computed from the current policy; cipo has no such term",
}


def _refuse(what: str, instead: str) -> None:
    raise ValueError(f"CipoGRPOTrainer(cipo_loss=True): {what}. {instead}")


def trl_loss_config(args: Any) -> PolicyLossConfig:
    """The :class:`~cipo.PolicyLossConfig` equivalent to a TRL ``GRPOConfig``; raise if there is none.

    Raises:
        ValueError: naming the setting with no equivalent (a ``loss_type`` in :data:`REFUSED_LOSS_TYPES`,
            ``importance_sampling_level="sequence"``, ``use_bias_correction_kl=True`` with ``beta != 0``,
            ``delta < 1 + epsilon_high``, adaptive entropy control, ``epsilon >= 1``) and what to use instead.
    """
    loss_type = args.loss_type
    keep_trl = "or keep TRL's loss (cipo_loss=False) — cipo's fused LM head still applies"
    if loss_type in REFUSED_LOSS_TYPES:
        _refuse(f"loss_type={loss_type!r} has no cipo equivalent ({REFUSED_LOSS_TYPES[loss_type]})",
                f"Use one of {sorted(LOSS_AGG_MODES)}, {keep_trl}")
    if loss_type not in LOSS_AGG_MODES:
        _refuse(f"unknown loss_type={loss_type!r}", f"Use one of {sorted(LOSS_AGG_MODES)}, {keep_trl}")
    if args.importance_sampling_level != "token":
        _refuse(f"importance_sampling_level={args.importance_sampling_level!r} (GSPO's sequence-level ratio "
                "exp(mean_t log ρ_t)) is not a cipo ratio", f"Use importance_sampling_level='token', {keep_trl}")
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if not 0 <= args.epsilon < 1:
        _refuse(f"epsilon={args.epsilon!r} puts the lower clip bound 1 - epsilon at or below 0",
                f"Use 0 <= epsilon < 1, {keep_trl}")
    clip_c = None
    if args.delta is not None:
        if not args.delta >= 1 + epsilon_high:
            _refuse(f"delta={args.delta!r} < 1 + epsilon_high = {1 + epsilon_high!r}: TRL's two-sided clip then "
                    "also caps positive advantages, which cipo's dual-clip (negative advantages only) does not",
                    f"Use delta >= 1 + epsilon_high (TRL recommends it), {keep_trl}")
        clip_c = float(args.delta)
    if args.beta != 0.0 and args.use_bias_correction_kl:
        _refuse(f"beta={args.beta!r} with use_bias_correction_kl=True multiplies TRL's k3 by the differentiable "
                "ratio ρ, which cipo's KL term does not", f"Set use_bias_correction_kl=False, {keep_trl}")
    if args.use_adaptive_entropy:
        _refuse("use_adaptive_entropy=True (TRL's adaptive entropy controller) is not covered",
                f"Use a fixed entropy_coef, {keep_trl}")
    return PolicyLossConfig(
        clip_ratio_low=float(args.epsilon),
        clip_ratio_high=float(epsilon_high),
        clip_ratio_c=clip_c,
        loss_agg_mode=LOSS_AGG_MODES[loss_type],
        kl_coef=float(args.beta),
        kl_type="low_var_kl",
        # TRL's entropy bonus is a token mean whatever the loss_type: the trainer adds it, not cipo's agg
        entropy_coef=0.0,
        temperature=float(args.temperature),
    )


def trl_loss_normalizer(loss_type: str, *, batch_size: int, num_tokens: float, num_items_in_batch: float,
                        max_completion_length: int, grad_accum: int, steps_per_generation: int, num_processes: int,
                        train: bool = True) -> float:
    """The ``loss_normalizer`` that makes cipo's aggregation equal TRL's for one micro-batch.

    Args:
        loss_type: TRL's ``loss_type`` (one of :data:`LOSS_AGG_MODES`).
        batch_size: sequences in this micro-batch (TRL's ``per_token_loss.size(0)``).
        num_tokens: loss tokens in this micro-batch (``mask.sum()``).
        num_items_in_batch: loss tokens of the whole generation batch over all processes (TRL's input of that name).
        max_completion_length: ``GRPOConfig.max_completion_length``.
        grad_accum: the trainer's ``current_gradient_accumulation_steps``.
        steps_per_generation, num_processes: from the config / accelerator.
        train: False in evaluation, where TRL neither accumulates nor splits the batch.
    """
    ga = grad_accum if train else 1
    if loss_type == "grpo" or loss_type == "luspo":
        return float(batch_size * ga)
    if loss_type == "bnpo":
        return float(max(num_tokens, 1.0) * ga)
    if loss_type == "dr_grpo":
        return float(batch_size * max_completion_length * ga)
    if loss_type == "dapo":
        normalizer = max(float(num_items_in_batch), 1.0) / num_processes
        return normalizer * grad_accum / steps_per_generation if train else normalizer
    raise ValueError(f"no cipo normaliser for loss_type={loss_type!r}")
