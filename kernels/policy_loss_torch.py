"""The torch path of the policy loss from per-token log-probs: what ``cipo.policy_loss`` runs on CPU tensors and in
float64 (the Triton kernel's float64 oracle in the tests is this path run in float64; the formulas themselves are
checked against the per-token loops of ``tests/core/loop_reference.py``).

Inputs are in the *flat* form every layout reduces to: token tensors ``[N]``, the sequence of each token
``seq_index [N]`` and the sequence count ``S``. Formulas are docs/DESIGN.md §4 (verl's ``core_algos``):

* ratio ``ρ = exp(clamp(logp − old, −20, 20))``;
* ``Lc = max(−Aρ, −A·clip(ρ, 1−ε_low, 1+ε_high))``; dual-clip: ``L = min(Lc, −A·c)`` where ``A < 0``;
* truncated IS: ``w = min(exp(Δ), C)`` with ``Δ = old − rollout`` per token, or its masked sum per sequence;
  computed as ``exp(min(Δ, log C))``, equal in exact arithmetic and free of overflow; ``L ← L·w``, w detached;
* precomputed importance weights (``is_weights``, what verl and TRL hand over): ``L ← L·is_w``, detached;
* KL to the reference (k1, k2, k3 = low_var_kl, abs) and the entropy bonus are aggregated like the loss.

Masked-out tokens contribute exactly nothing, whatever their values (``where``, not multiplication, so a
NaN or inf outside the mask cannot leak into the loss or its gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

LOG_RATIO_CLAMP = 20.0
K3_LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


@dataclass
class TokenTerms:
    """Per-token pieces of the loss, ``[N]`` each, in the compute dtype."""

    pg: torch.Tensor
    kl: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    clipped: torch.Tensor          # bool: the ε-clip is the active side
    clipped_lower: torch.Tensor    # bool: dual-clip active (A < 0)
    neg_log_ratio: torch.Tensor    # old − logp, clamped as the ratio's exponent
    tis_capped: Optional[torch.Tensor]  # bool: the IS weight was truncated


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate of the policy against the reference; ``estimator`` in k1, k2, k3, abs, or k1+, k3+,
    abs+: straight-through (verl 0.9.1's ``+``) — the value of k1/k3/abs with the gradient of k2, whose expected
    gradient is the KL's."""
    if estimator.endswith("+"):
        value = kl_penalty(logp, ref_logp, estimator[:-1])
        k2 = kl_penalty(logp, ref_logp, "k2")
        return k2 - k2.detach() + value.detach()
    diff = logp - ref_logp
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff.square()
    if estimator == "abs":
        return diff.abs()
    if estimator == "k3":
        x = torch.clamp(-diff, -K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
        return torch.clamp(torch.exp(x) - x - 1, -K3_CLAMP, K3_CLAMP)
    raise ValueError(f"unknown KL estimator {estimator!r}")


def segment_sum(values: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """``[S]`` sums of ``values [N]`` per sequence (differentiable)."""
    return torch.zeros(num_seqs, dtype=values.dtype, device=values.device).index_add(0, seq_index, values)


def token_terms(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                seq_index: torch.Tensor, num_seqs: int, *, clip_ratio_low: float, clip_ratio_high: float,
                clip_ratio_c: Optional[float], kl_estimator: Optional[str], tis_mode: Optional[str],
                tis_cap: float, ref_logp: Optional[torch.Tensor] = None,
                rollout_logp: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None,
                is_weights: Optional[torch.Tensor] = None) -> TokenTerms:
    """Per-token loss terms. All token tensors ``[N]`` in one floating dtype; ``mask`` bool ``[N]``.

    ``kl_estimator`` None skips the KL term; ``tis_mode`` None skips truncated importance sampling;
    ``is_weights`` (precomputed importance weights, e.g. verl's ``rollout_is_weights``) multiply the policy
    term as constants, after the TIS weight.
    """
    neg_kl = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(neg_kl)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clip1 = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if clip_ratio_c is not None:
        pg3 = -advantages * clip_ratio_c
        negative = advantages < 0
        pg = torch.where(negative, torch.minimum(pg3, clip1), clip1)
        clipped_lower = (clip1 > pg3) & negative
    else:
        pg = clip1
        clipped_lower = torch.zeros_like(clipped)

    tis_capped = None
    if tis_mode is not None:
        log_w = torch.where(mask, old_logp - rollout_logp, torch.zeros_like(old_logp)).detach()
        if tis_mode == "sequence":
            log_w = segment_sum(log_w, seq_index, num_seqs)[seq_index]
        log_cap = math.log(tis_cap)
        tis_capped = log_w > log_cap
        pg = pg * torch.exp(torch.clamp(log_w, max=log_cap))
    if is_weights is not None:
        pg = pg * is_weights.detach()

    kl = kl_penalty(logp, ref_logp, kl_estimator) if kl_estimator is not None else None
    return TokenTerms(pg=pg, kl=kl, entropy=entropy, clipped=clipped, clipped_lower=clipped_lower,
                      neg_log_ratio=-neg_kl, tis_capped=tis_capped)


def aggregate(values: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor, num_seqs: int, mode: str,
              *, scale_factor: float, normalizer: Optional[float] = None) -> torch.Tensor:
    """Aggregate per-token ``values [N]`` over the tokens where ``mask`` is True (docs/DESIGN.md §4).

    Args:
        mode: ``token-mean``, ``token-sum``, ``seq-mean-token-sum``, ``seq-mean-token-mean`` or
            ``seq-mean-token-sum-norm`` (``seq-mean-token-sum`` then ÷ ``scale_factor``, verl 0.9.1's
            ``agg_loss``).
        scale_factor: the constant divisor of ``seq-mean-token-sum-norm``.
        normalizer: replaces the denominator of the mean modes — the global token count (``token-mean``) or
            global sequence count (``seq-mean-*``) when a step is split into micro-batches or ranks.

    Returns:
        A 0-dim tensor; exactly 0 (still attached to the graph) when nothing is in the mask.
    """
    masked = torch.where(mask, values, torch.zeros_like(values))
    if mode == "token-sum":
        return masked.sum()
    if mode == "seq-mean-token-sum-norm":
        return aggregate(values, mask, seq_index, num_seqs, "seq-mean-token-sum", scale_factor=scale_factor,
                         normalizer=normalizer) / scale_factor
    if mode == "token-mean":
        denom = float(normalizer) if normalizer is not None else mask.sum()
        return masked.sum() / denom if normalizer is not None or bool(mask.any()) else masked.sum()
    seq_sum = segment_sum(masked, seq_index, num_seqs)
    seq_count = segment_sum(mask.to(values.dtype), seq_index, num_seqs)
    present = seq_count > 0
    if mode == "seq-mean-token-mean":
        seq_sum = torch.where(present, seq_sum / seq_count.clamp(min=1), torch.zeros_like(seq_sum))
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"unknown loss_agg_mode {mode!r}")
    if normalizer is not None:
        return seq_sum.sum() / float(normalizer)
    num_present = present.sum()
    return seq_sum.sum() / num_present if bool(num_present > 0) else seq_sum.sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the mask; 0 when the mask is empty (a metric, never differentiated)."""
    values = values.to(torch.float64) if values.dtype == torch.bool else values
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    count = mask.sum()
    return total / count if bool(count > 0) else total


def token_coefficients(mask: torch.Tensor, seq_index: torch.Tensor, num_seqs: int, mode: str, *,
                       scale_factor: float, normalizer: Optional[float] = None, dtype: torch.dtype = torch.float32
                       ) -> torch.Tensor:
    """Coefficients ``c [N]`` with ``aggregate(values) == Σ_t c_t · values_t`` for every ``values``.

    Every aggregation mode is linear in the per-token values, so a fused kernel needs only ``c``: the loss is
    ``Σ c·ℓ`` and ``∂loss/∂ℓ_t = c_t``. Masked-out tokens get exactly 0.
    """
    m = mask.to(dtype)
    if mode == "token-sum":
        return m
    if mode == "seq-mean-token-sum-norm":
        return token_coefficients(mask, seq_index, num_seqs, "seq-mean-token-sum", scale_factor=scale_factor,
                                  normalizer=normalizer, dtype=dtype) / scale_factor
    if mode == "token-mean":
        denom = float(normalizer) if normalizer is not None else m.sum().clamp(min=1)
        return m / denom
    seq_count = segment_sum(m, seq_index, num_seqs)
    if normalizer is not None:
        num_present = torch.tensor(float(normalizer), dtype=dtype, device=m.device)
    else:
        num_present = (seq_count > 0).sum().clamp(min=1).to(dtype)
    if mode == "seq-mean-token-sum":
        return m / num_present
    if mode == "seq-mean-token-mean":
        return m / (seq_count.clamp(min=1)[seq_index] * num_present)
    raise ValueError(f"unknown loss_agg_mode {mode!r}")

