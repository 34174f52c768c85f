"""Triton fast path of the policy loss from per-token log-probs (``cipo.policy_loss``, ``cipo.cipo_policy_loss``).

Formulas are DESIGN §4, exactly as :mod:`.policy_loss_ref` states them; this module only changes *how* they
are evaluated. The entry point :func:`policy_loss_triton` receives the flat inputs of one loss call and its
stream parts (``loss = Σ_p weight_p · agg_p(ℓ)``) from ``cipo.loss._loss_from_flat``.

Design — one elementwise pass, gradient finished in the forward:

* Every aggregation mode is linear in the per-token values: ``agg_p(v) = Σ_t c_p[t]·v_t`` with ``c_p`` from
  :func:`.policy_loss_ref.token_coefficients` (part mask, part normaliser). torch computes ``c`` as ``[P, N]``
  (a few tiny segment sums); the Triton kernel does the rest in fp32, blocks of :data:`BLOCK` tokens:
  ratio with its ±20 clamp, clipped / dual-clipped surrogate, truncated-IS and precomputed importance
  weights, KL estimate, and the
  analytic derivative ``dℓ_t/dlogp_t`` of ``ℓ_t = pg_t·w_t + β·kl_t − γ·H_t`` (β, γ only where they are > 0,
  as in the reference). It stores ``dlogp_t = c_total[t] · dℓ_t/dlogp_t`` with ``c_total = Σ_p weight_p·c_p``,
  ``dH_t = −γ·c_total[t]``, and per block the partial sums ``Σ c_p·pg``, ``Σ c_p·kl``, ``Σ c_p·H`` for each
  part plus the metric counts. Blocks are summed in float64 by torch (fixed order: deterministic).
* The loss is ``Σ_p weight_p·(PG_p + β·KL_p − γ·H_p)``; the backward only scales the stored ``dlogp``/``dH``
  by the incoming gradient (no recomputation; it is ``once_differentiable``).
* Sequence-mode TIS needs the masked per-sequence sum of ``old − rollout`` before the pass: computed by torch
  in float64 (``index_add``), gathered back to tokens, and read by the kernel as the log-weight.

Conventions:

* Masked-out tokens contribute exactly nothing, whatever their values: the kernel selects 0 (``where``) for
  their terms and derivatives, so NaN/inf outside the mask cannot leak, as in the reference.
* Derivatives follow torch autograd of the reference formulas evaluated in fp32, ties included: ``clamp``
  passes the gradient on its closed interval (so the log-ratio clamp kills it only strictly outside ±20, and
  ``clip(ρ)`` passes it for ``1−ε_low ≤ ρ ≤ 1+ε_high``); ``maximum``/``minimum`` split it half/half where the
  two sides are equal (inside the clip range ``−Aρ == −A·clip(ρ)``, so both halves add to the full gradient);
  ``abs`` has derivative ``sign`` (0 at 0). The TIS weight is detached.
* ``cipo_policy_loss`` with no correction sequences equals ``policy_loss`` bit for bit: the correction
  coefficients are exactly 0, so ``c_total = 1·c_base + λ·0 = c_base``, the correction partial sums are exact
  zeros, and every base-stream quantity goes through the same operations in the same order.
  (Verified bit for bit under the interpreter; on a GPU it rests on the base part being the same instruction
  sequence in the one-part and two-part specialisations of the kernel.)
* Determinism: no atomics in the kernel; the coefficients' segment sums add 0/1 values (exact in fp32); the
  sequence-TIS sum is a float64 ``index_add`` (on CUDA its order may vary, at the 1e-16 level, before the
  rounding to fp32).
* Precision: fp32 compute (float64 inputs are accepted and computed in fp32; loss and gradients are returned
  in the input dtype; the metrics are the float64 sums of the fp32 block sums). Per-block sums are fp32 tree
  reductions of ≤ :data:`BLOCK` terms, the cross-block sum is float64. Agreement with the float64 reference is
  a few 1e-7 relative to the aggregate of the *absolute* token terms (the exponent of the ratio is rounded
  before ``exp``: relative error ≈ u·max(|logp|, |old|)); the tests allow 1e-5 of that scale.
* Not supported: double backward (the gradient is a stored constant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._policy_math import policy_token_terms
from .policy_loss_ref import K3_CLAMP, K3_LOG_RATIO_CLAMP, LOG_RATIO_CLAMP, part_losses, token_coefficients

if TYPE_CHECKING:  # only for annotations: cipo.loss imports this module lazily, never the other way round
    from ..config import PolicyLossConfig
    from ..loss import FlatInputs, StreamPart

BLOCK = 1024
"""Tokens per program: big blocks keep the interpreter fast and a GPU's memory pipes busy."""

_KL_CODE = {"k1": 1, "k2": 2, "k3": 3, "abs": 4}
_TIS_CODE = {None: 0, "token": 1, "sequence": 2}

# Columns of the per-block partial sums: 3 per part (pg, kl, entropy), then the metrics below.
_COL_COUNT, _COL_CLIPPED, _COL_CLIPPED_LOWER, _COL_NEG_LOG_RATIO, _COL_TIS_CAPPED = range(5)
_NUM_METRIC_COLS = 5


@triton.jit
def _policy_loss_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, tis_ptr, isw_ptr, ent_ptr, coef_ptr, weight_ptr,
    dlogp_ptr, dent_ptr, partial_ptr,
    n_tokens, clip_low, clip_high, clip_c, log_cap, kl_coef, ent_coef,
    NUM_PARTS: tl.constexpr, NUM_COLS: tl.constexpr, DUAL_CLIP: tl.constexpr, KL_MODE: tl.constexpr,
    KL_IN_LOSS: tl.constexpr, TIS_MODE: tl.constexpr, HAS_IS_W: tl.constexpr, HAS_ENT: tl.constexpr,
    ENT_IN_LOSS: tl.constexpr, RATIO_CLAMP: tl.constexpr, K3_X_CLAMP: tl.constexpr, K3_Y_CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per-token terms and derivatives of one block (math: :func:`._policy_math.policy_token_terms`); see the
    module docstring for the outputs."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: coef rows sit at p·N
    inb = offs < n_tokens
    m = (tl.load(mask_ptr + offs, mask=inb, other=0) != 0) & inb
    logp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=inb, other=0.0).to(tl.float32)

    ref = logp  # placeholders, never read when their mode is off
    if KL_MODE != 0:
        ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    tis_in = logp
    if TIS_MODE != 0:
        # Token TIS: the rollout log-prob; sequence TIS: the per-token log-weight.
        tis_in = tl.load(tis_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    is_w = logp
    if HAS_IS_W:
        is_w = tl.load(isw_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    pg, kl, dl, nlr, clipped, clipped_lower, tis_capped = policy_token_terms(
        logp, old, adv, m, ref, tis_in, is_w, clip_low, clip_high, clip_c, log_cap, kl_coef,
        DUAL_CLIP, KL_MODE, KL_IN_LOSS, TIS_MODE, HAS_IS_W, RATIO_CLAMP, K3_X_CLAMP, K3_Y_CLAMP,
    )
    if HAS_ENT:
        ent = tl.where(m, tl.load(ent_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)

    row = partial_ptr + pid * NUM_COLS
    c_total = tl.zeros([BLOCK], dtype=tl.float32)
    for p in tl.static_range(NUM_PARTS):
        c = tl.load(coef_ptr + p * n_tokens + offs, mask=inb, other=0.0)
        c_total += tl.load(weight_ptr + p) * c
        tl.store(row + 3 * p, tl.sum(c * pg, axis=0))
        if KL_MODE != 0:
            tl.store(row + 3 * p + 1, tl.sum(c * kl, axis=0))
        if HAS_ENT:
            tl.store(row + 3 * p + 2, tl.sum(c * ent, axis=0))

    tl.store(dlogp_ptr + offs, c_total * dl, mask=inb)
    if ENT_IN_LOSS:
        tl.store(dent_ptr + offs, -ent_coef * c_total, mask=inb)

    met = row + 3 * NUM_PARTS
    tl.store(met + 0, tl.sum(tl.where(m, 1.0, 0.0), axis=0))
    tl.store(met + 1, tl.sum(tl.where(clipped, 1.0, 0.0), axis=0))
    tl.store(met + 2, tl.sum(tl.where(clipped_lower, 1.0, 0.0), axis=0))
    tl.store(met + 3, tl.sum(nlr, axis=0))
    if TIS_MODE != 0:
        tl.store(met + 4, tl.sum(tl.where(tis_capped, 1.0, 0.0), axis=0))


@dataclass
class _Plan:
    """Everything one launch needs besides the differentiable ``logp`` / ``entropy`` (all detached)."""

    old_logp: torch.Tensor       # [N] float
    advantages: torch.Tensor     # [N] float
    mask: torch.Tensor           # [N] uint8 view of the bool mask
    ref_logp: Optional[torch.Tensor]   # [N] float, KL_MODE != 0
    tis_input: Optional[torch.Tensor]  # [N]: rollout_logp (token TIS) or the per-token sequence log-weight
    is_weights: Optional[torch.Tensor]  # [N] float: precomputed importance weights
    coefs: torch.Tensor          # [P, N] float32 aggregation coefficients per part
    weights: torch.Tensor        # [P] float32 part weights
    part_weights: list[float]    # the same, as Python floats, for the float64 combination
    clip_low: float
    clip_high: float
    clip_c: Optional[float]
    log_cap: float
    kl_coef: float
    ent_coef: float
    kl_mode: int
    kl_in_loss: bool
    tis_mode: int
    has_ent: bool
    ent_in_loss: bool


def _launch(logp: torch.Tensor, entropy: Optional[torch.Tensor], plan: _Plan
            ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Run the kernel; returns ``(column sums [3P+5] float64, dlogp [N] float32, dH [N] float32 or None)``."""
    n = logp.numel()
    num_parts = plan.coefs.shape[0]
    num_cols = 3 * num_parts + _NUM_METRIC_COLS
    device = logp.device
    dlogp = torch.empty(n, dtype=torch.float32, device=device)
    dent = torch.empty(n, dtype=torch.float32, device=device) if plan.ent_in_loss else None
    if n == 0:
        return torch.zeros(num_cols, dtype=torch.float64, device=device), dlogp, dent
    num_blocks = triton.cdiv(n, BLOCK)
    partials = torch.zeros(num_blocks, num_cols, dtype=torch.float32, device=device)
    dummy = logp  # stands in for absent optional inputs; never read (its constexpr branch is compiled out)
    _policy_loss_fwd_kernel[(num_blocks,)](
        logp, plan.old_logp, plan.advantages, plan.mask,
        plan.ref_logp if plan.ref_logp is not None else dummy,
        plan.tis_input if plan.tis_input is not None else dummy,
        plan.is_weights if plan.is_weights is not None else dummy,
        entropy if entropy is not None else dummy,
        plan.coefs, plan.weights, dlogp, dent if dent is not None else dlogp, partials,
        n, plan.clip_low, plan.clip_high, plan.clip_c if plan.clip_c is not None else 0.0, plan.log_cap,
        plan.kl_coef, plan.ent_coef,
        NUM_PARTS=num_parts, NUM_COLS=num_cols, DUAL_CLIP=plan.clip_c is not None, KL_MODE=plan.kl_mode,
        KL_IN_LOSS=plan.kl_in_loss, TIS_MODE=plan.tis_mode, HAS_IS_W=plan.is_weights is not None,
        HAS_ENT=plan.has_ent, ENT_IN_LOSS=plan.ent_in_loss,
        RATIO_CLAMP=LOG_RATIO_CLAMP, K3_X_CLAMP=K3_LOG_RATIO_CLAMP, K3_Y_CLAMP=K3_CLAMP, BLOCK=BLOCK,
        num_warps=4,
    )
    return partials.sum(0, dtype=torch.float64), dlogp, dent


class _PolicyLossFunction(torch.autograd.Function):
    """``loss = Σ_p weight_p·agg_p(ℓ)`` from ``logp [N]`` (and ``entropy [N]``); backward scales stored grads."""

    @staticmethod
    def forward(ctx, logp: torch.Tensor, entropy: Optional[torch.Tensor], plan: _Plan
                ) -> tuple[torch.Tensor, torch.Tensor]:
        sums, dlogp, dent = _launch(logp, entropy, plan)
        loss = None
        for weight, part in zip(plan.part_weights, part_losses(sums, len(plan.part_weights), plan)):
            loss = part * weight if loss is None else loss + part * weight
        loss = loss.to(logp.dtype)
        ctx.mark_non_differentiable(sums)
        ctx.save_for_backward(dlogp, dent)
        ctx.logp_dtype = logp.dtype
        ctx.ent_dtype = entropy.dtype if entropy is not None else None
        return loss, sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor, grad_sums: Optional[torch.Tensor]
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
        dlogp, dent = ctx.saved_tensors
        g = grad_loss.to(torch.float32)
        grad_logp = (dlogp * g).to(ctx.logp_dtype) if ctx.needs_input_grad[0] else None
        grad_ent = None
        if ctx.needs_input_grad[1] and dent is not None:
            grad_ent = (dent * g).to(ctx.ent_dtype)
        return grad_logp, grad_ent, None


def policy_loss_triton(flat: "FlatInputs", config: "PolicyLossConfig", parts: list["StreamPart"],
                       scale_factor: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss and metrics of ``cipo.loss._loss_from_flat`` computed by the Triton kernel.

    Args:
        flat: flat token tensors ``[N]`` (float32 or float64; bool mask; int64 ``seq_index`` with
            ``flat.num_seqs`` sequences). Gradients flow into ``flat.logp`` and, when
            ``config.entropy_coef > 0``, into ``flat.entropy``.
        config: the loss knobs (validated by the caller, as are the presence of ref/rollout/entropy).
        parts: the stream parts, ≥ 1; each part's mask is a subset of ``flat.mask``.
        scale_factor: divisor of ``seq-mean-token-sum-norm``.

    Returns:
        ``(loss, metrics)``: a 0-dim tensor in ``flat.logp.dtype``; the reference's keys — ``loss/<part>``
        for each part, ``pg_loss``, ``clipfrac``, ``clipfrac_lower``, ``approx_kl``, and ``kl`` (when
        ``ref_logp`` is given), ``entropy`` (when ``entropy`` is given), ``tis_clipfrac`` (when TIS is on).
    """
    from ..loss import metrics_to_floats  # lazy: cipo.loss imports this module inside a function

    if not parts:
        raise ValueError("policy_loss_triton needs at least one stream part")
    device = flat.logp.device
    f32 = torch.float32
    coefs = torch.stack([
        token_coefficients(part.mask.to(device), flat.seq_index, flat.num_seqs, config.loss_agg_mode,
                           scale_factor=scale_factor, normalizer=part.normalizer, dtype=f32)
        for part in parts
    ]).contiguous()
    part_weights = [float(part.weight) for part in parts]

    tis_mode = _TIS_CODE[config.tis_mode]
    tis_input = None
    if tis_mode == 1:
        tis_input = flat.rollout_logp.detach().contiguous()
    elif tis_mode == 2:
        # Per-sequence log-weight, masked sum of old − rollout, in float64 (then fp32 for the kernel).
        delta = torch.where(flat.mask, flat.old_logp.detach().double() - flat.rollout_logp.detach().double(), 0.0)
        seq_sum = torch.zeros(flat.num_seqs, dtype=torch.float64, device=device).index_add_(0, flat.seq_index,
                                                                                            delta)
        tis_input = seq_sum[flat.seq_index].to(f32).contiguous()

    kl_mode = _KL_CODE[config.kl_estimator] if flat.ref_logp is not None else 0
    has_ent = flat.entropy is not None
    plan = _Plan(
        old_logp=flat.old_logp.detach().contiguous(),
        advantages=flat.advantages.detach().contiguous(),
        mask=flat.mask.contiguous().view(torch.uint8),
        ref_logp=flat.ref_logp.detach().contiguous() if kl_mode else None,
        tis_input=tis_input,
        is_weights=flat.is_weights.detach().contiguous() if flat.is_weights is not None else None,
        coefs=coefs,
        weights=torch.tensor(part_weights, dtype=f32, device=device),
        part_weights=part_weights,
        clip_low=1.0 - config.clip_ratio_low,
        clip_high=1.0 + config.clip_ratio_high,
        clip_c=config.clip_ratio_c,
        log_cap=math.log(config.tis_cap),
        kl_coef=float(config.kl_coef),
        ent_coef=float(config.entropy_coef),
        kl_mode=kl_mode,
        kl_in_loss=bool(kl_mode) and config.kl_coef > 0,
        tis_mode=tis_mode,
        has_ent=has_ent,
        ent_in_loss=has_ent and config.entropy_coef > 0,
    )
    entropy = flat.entropy.contiguous() if has_ent else None
    loss, sums = _PolicyLossFunction.apply(flat.logp.contiguous(), entropy, plan)

    named: dict[str, torch.Tensor] = {}
    losses = part_losses(sums, len(plan.part_weights), plan)
    for part, value in zip(parts, losses):
        named[f"loss/{part.name}"] = value

    def weighted(col: int) -> torch.Tensor:
        total = None
        for p, weight in enumerate(part_weights):
            term = sums[3 * p + col] * weight
            total = term if total is None else total + term
        return total

    met = sums[3 * len(parts):]
    count = met[_COL_COUNT].clamp(min=1.0)  # masked_mean of an empty mask is 0: its total is 0
    named["pg_loss"] = weighted(0)
    named["clipfrac"] = met[_COL_CLIPPED] / count
    named["clipfrac_lower"] = met[_COL_CLIPPED_LOWER] / count
    named["approx_kl"] = met[_COL_NEG_LOG_RATIO] / count
    if kl_mode:
        named["kl"] = weighted(1)
    if has_ent:
        named["entropy"] = weighted(2)
    if tis_mode:
        named["tis_clipfrac"] = met[_COL_TIS_CAPPED] / count
    return loss, metrics_to_floats(named)
