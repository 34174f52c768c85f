"""The one plan both policy-loss kernels read: :class:`LossPlan`, plus what they share around it.

``policy_loss`` (from per-token log-probs) and ``fused_linear_policy_loss`` (from hidden states) compute the same
loss — ``Σ_p weight_p · (PG_p + β·KL_p − γ·H_p)`` over stream parts ``p`` (one part for ``cipo.policy_loss``; base
and correction for CIPO) — so they share, defined once here:

* the scalar knobs as a kernel reads them (mode codes, clip bounds, the log of the TIS cap);
* the layout of the per-program partial sums (:func:`num_cols`: 3 columns per part, then the metric counts; the
  kernels write it with ``_policy_math.store_partial_sums``, the torch path of the fused loss in the same order);
* the sequence-level truncated-IS log-weight (:func:`seq_log_weight`);
* the loss and the metric dict from the float64 column sums (:meth:`LossPlan.loss_from_sums`,
  :meth:`LossPlan.metrics`), with ``cipo.policy_loss``'s keys and order.

The plan is built by the caller (``cipo.loss`` / ``cipo.fused_loss`` from a ``PolicyLossConfig``): this package
imports only torch and triton.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .policy_loss_torch import token_coefficients

KL_CODE = {"k1": 1, "k2": 2, "k3": 3, "abs": 4}
TIS_CODE = {None: 0, "token": 1, "sequence": 2}

# Partial-sum columns: (pg, kl, entropy) for each part at 3·p + COL_*, then the metric counts at 3·P + COL_*.
COL_PG, COL_KL, COL_ENT = range(3)
COL_COUNT, COL_CLIPPED, COL_CLIPPED_LOWER, COL_NEG_LOG_RATIO, COL_TIS_CAPPED = range(5)
NUM_METRIC_COLS = 5


def num_cols(num_parts: int) -> int:
    """Columns of the partial sums for ``num_parts`` stream parts."""
    return 3 * num_parts + NUM_METRIC_COLS


@dataclass(frozen=True)
class LossPlan:
    """Everything about one loss call that is not a per-token tensor.

    Attributes:
        part_names: names of the stream parts (``("all",)`` or ``("base", "corr")``), keys ``loss/<name>``.
        part_weights: their weights (1 and λ).
        part_normalizers: each part's global token/sequence count for micro-batches, or None (local count).
        loss_agg_mode: one of the five aggregation modes (docs/DESIGN.md §4).
        scale_factor: the divisor of ``seq-mean-token-sum-norm``.
        clip_ratio_low, clip_ratio_high: ε_low, ε_high.
        clip_ratio_c: the dual-clip bound, or None.
        kl_estimator: ``k1``/``k2``/``k3``/``abs`` (or straight-through ``k1+``/``k3+``/``abs+``) when reference
            log-probs are given, else None (no KL at all).
        kl_coef: β (the KL enters the loss only when > 0; it is a metric whenever ``kl_estimator`` is set).
        entropy_coef: γ (the entropy enters the loss only when > 0 and ``has_entropy``).
        has_entropy: the per-token entropy is known (given, or computed by the fused loss): ``entropy`` metric.
        tis_mode: None, ``"token"`` or ``"sequence"``.
        tis_cap: C of the truncated importance weight.
        temperature: divides the logits (the fused loss; unused from log-probs).
    """

    part_names: tuple[str, ...]
    part_weights: tuple[float, ...]
    part_normalizers: tuple[Optional[float], ...]
    loss_agg_mode: str
    scale_factor: float
    clip_ratio_low: float
    clip_ratio_high: float
    clip_ratio_c: Optional[float]
    kl_estimator: Optional[str]
    kl_coef: float
    entropy_coef: float
    has_entropy: bool
    tis_mode: Optional[str]
    tis_cap: float
    temperature: float = 1.0

    @property
    def num_parts(self) -> int:
        return len(self.part_names)

    @property
    def num_cols(self) -> int:
        return num_cols(self.num_parts)

    @property
    def clip_low(self) -> float:
        return 1.0 - self.clip_ratio_low

    @property
    def clip_high(self) -> float:
        return 1.0 + self.clip_ratio_high

    @property
    def log_cap(self) -> float:
        return math.log(self.tis_cap)

    @property
    def inv_temp(self) -> float:
        return 1.0 / float(self.temperature)

    @property
    def kl_mode(self) -> int:
        """Kernel code of the KL estimator's value; 0: no KL."""
        return KL_CODE[self.kl_estimator.rstrip("+")] if self.kl_estimator is not None else 0

    @property
    def kl_straight_through(self) -> bool:
        """The estimator's gradient is k2's (verl's ``+`` suffix)."""
        return self.kl_estimator is not None and self.kl_estimator.endswith("+")

    @property
    def kl_in_loss(self) -> bool:
        return self.kl_estimator is not None and self.kl_coef > 0

    @property
    def ent_in_loss(self) -> bool:
        return self.has_entropy and self.entropy_coef > 0

    @property
    def tis_code(self) -> int:
        return TIS_CODE[self.tis_mode]

    def part_losses(self, sums: torch.Tensor) -> list[torch.Tensor]:
        """``[PG_p + β·KL_p − γ·H_p]`` per part (0-dim, dtype of ``sums``), each term only where the loss has it."""
        out = []
        for p in range(self.num_parts):
            part = sums[3 * p + COL_PG]
            if self.kl_in_loss:
                part = part + self.kl_coef * sums[3 * p + COL_KL]
            if self.ent_in_loss:
                part = part - self.entropy_coef * sums[3 * p + COL_ENT]
            out.append(part)
        return out

    def loss_from_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """``Σ_p weight_p · part_loss_p`` from the float64 column sums (0-dim float64)."""
        loss = None
        for weight, part in zip(self.part_weights, self.part_losses(sums)):
            loss = part * weight if loss is None else loss + part * weight
        return loss

    def metrics(self, sums: torch.Tensor, extra: Optional[dict[str, torch.Tensor]] = None) -> dict[str, float]:
        """The metric dict of ``cipo.policy_loss`` / ``cipo_policy_loss`` (same keys, same order) from the column
        sums: ``loss/<part>``, ``pg_loss``, ``clipfrac``, ``clipfrac_lower``, ``approx_kl``, then ``kl`` (with a KL
        estimator), ``entropy`` (with entropy), ``tis_clipfrac`` (with TIS), then ``extra``; one device sync."""
        named: dict[str, torch.Tensor] = {}
        for name, value in zip(self.part_names, self.part_losses(sums)):
            named[f"loss/{name}"] = value

        def weighted(col: int) -> torch.Tensor:
            total = None
            for p, weight in enumerate(self.part_weights):
                term = sums[3 * p + col] * weight
                total = term if total is None else total + term
            return total

        met = sums[3 * self.num_parts:]
        count = met[COL_COUNT].clamp(min=1.0)  # masked_mean of an empty mask is 0: its total is 0
        named["pg_loss"] = weighted(COL_PG)
        named["clipfrac"] = met[COL_CLIPPED] / count
        named["clipfrac_lower"] = met[COL_CLIPPED_LOWER] / count
        named["approx_kl"] = met[COL_NEG_LOG_RATIO] / count
        if self.kl_estimator is not None:
            named["kl"] = weighted(COL_KL)
        if self.has_entropy:
            named["entropy"] = weighted(COL_ENT)
        if self.tis_mode is not None:
            named["tis_clipfrac"] = met[COL_TIS_CAPPED] / count
        named.update(extra or {})
        return metrics_to_floats(named)


def metrics_to_floats(named: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-dim tensors → floats with one device sync for all of them."""
    keys = list(named)
    if not keys:
        return {}
    values = torch.stack([named[k].detach().to(torch.float64) for k in keys]).tolist()
    return dict(zip(keys, values))


def seq_log_weight(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor,
                   num_seqs: int, dtype: torch.dtype) -> torch.Tensor:
    """Sequence-level truncated-IS log-weight per token ``[N]`` in ``dtype``: the masked per-sequence sum of
    ``old − rollout`` (float64: a sum over thousands of tokens), gathered back to the sequence's tokens."""
    delta = torch.where(mask, old_logp.detach().double() - rollout_logp.detach().double(), 0.0)
    sums = torch.zeros(num_seqs, dtype=torch.float64, device=delta.device).index_add_(0, seq_index, delta)
    return sums[seq_index].to(dtype).contiguous()


def part_coefficients(plan: LossPlan, part_masks: list[torch.Tensor], seq_index: torch.Tensor, num_seqs: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Aggregation coefficients ``[P, N]`` of the parts (``agg_p(v) = Σ_t c_p[t]·v_t``, contiguous)."""
    return torch.stack([
        token_coefficients(pm, seq_index, num_seqs, plan.loss_agg_mode, scale_factor=plan.scale_factor,
                           normalizer=norm, dtype=dtype)
        for pm, norm in zip(part_masks, plan.part_normalizers)
    ]).contiguous()
