"""Triton fast path of the policy loss from per-token log-probs (``cipo.policy_loss``, ``cipo.cipo_policy_loss``).

Formulas are docs/DESIGN.md §4, exactly as :mod:`.policy_loss_torch` states them; this module only changes *how* they
are evaluated. The entry point :func:`policy_loss_triton` receives the flat token tensors of one loss call, one
mask per stream part and the :class:`._loss_plan.LossPlan` (``loss = Σ_p weight_p · agg_p(ℓ)``) from
``cipo.loss``.

Design — one elementwise pass, gradient finished in the forward:

* Every aggregation mode is linear in the per-token values: ``agg_p(v) = Σ_t c_p[t]·v_t`` with ``c_p`` from
  :func:`.policy_loss_torch.token_coefficients` (part mask, part normaliser). torch computes ``c`` as ``[P, N]``
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

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._loss_plan import LossPlan, part_coefficients, seq_log_weight
from ._policy_math import policy_token_terms, store_partial_sums
from .policy_loss_torch import K3_CLAMP, K3_LOG_RATIO_CLAMP, LOG_RATIO_CLAMP

BLOCK = 1024
"""Tokens per program: big blocks keep the interpreter fast and a GPU's memory pipes busy."""


@triton.jit
def _policy_loss_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, tis_ptr, isw_ptr, ent_ptr, coef_ptr, weight_ptr,
    dlogp_ptr, dent_ptr, partial_ptr,
    n_tokens, clip_low, clip_high, clip_c, log_cap, kl_coef, ent_coef,
    NUM_PARTS: tl.constexpr, NUM_COLS: tl.constexpr, DUAL_CLIP: tl.constexpr, KL_MODE: tl.constexpr,
    KL_ST: tl.constexpr, KL_IN_LOSS: tl.constexpr, TIS_MODE: tl.constexpr, HAS_IS_W: tl.constexpr,
    HAS_ENT: tl.constexpr,
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
        DUAL_CLIP, KL_MODE, KL_ST, KL_IN_LOSS, TIS_MODE, HAS_IS_W, RATIO_CLAMP, K3_X_CLAMP, K3_Y_CLAMP,
    )
    ent = pg  # placeholder, never stored without HAS_ENT
    if HAS_ENT:
        ent = tl.where(m, tl.load(ent_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)

    # The partial-sum buffer starts at zero: columns of absent terms stay 0.
    c_total = store_partial_sums(
        partial_ptr + pid * NUM_COLS, coef_ptr, n_tokens, offs, inb, weight_ptr, m, pg, kl, ent, nlr, clipped,
        clipped_lower, tis_capped, NUM_PARTS, KL_MODE != 0, HAS_ENT, TIS_MODE != 0,
    )
    tl.store(dlogp_ptr + offs, c_total * dl, mask=inb)
    if ENT_IN_LOSS:
        tl.store(dent_ptr + offs, -ent_coef * c_total, mask=inb)


def _launch(logp: torch.Tensor, entropy: Optional[torch.Tensor], tokens: dict[str, Optional[torch.Tensor]],
            plan: LossPlan) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Run the kernel; returns ``(column sums [3P+5] float64, dlogp [N] float32, dH [N] float32 or None)``.

    ``tokens``: the detached, contiguous inputs of :func:`policy_loss_triton` (``old``, ``adv``, ``mask`` as
    uint8, ``ref``, ``tis``: rollout log-probs or the sequence log-weight, ``is_w``, ``coefs [P, N]``, ``weights
    [P]``)."""
    n = logp.numel()
    num_parts = plan.num_parts
    device = logp.device
    dlogp = torch.empty(n, dtype=torch.float32, device=device)
    dent = torch.empty(n, dtype=torch.float32, device=device) if plan.ent_in_loss else None
    if n == 0:
        return torch.zeros(plan.num_cols, dtype=torch.float64, device=device), dlogp, dent
    num_blocks = triton.cdiv(n, BLOCK)
    partials = torch.zeros(num_blocks, plan.num_cols, dtype=torch.float32, device=device)

    def opt(t: Optional[torch.Tensor]) -> torch.Tensor:
        return t if t is not None else logp  # stands in for an absent buffer; its constexpr branch never touches it

    _policy_loss_fwd_kernel[(num_blocks,)](
        logp, tokens["old"], tokens["adv"], tokens["mask"], opt(tokens["ref"]), opt(tokens["tis"]),
        opt(tokens["is_w"]), opt(entropy), tokens["coefs"], tokens["weights"], dlogp, opt(dent), partials,
        n, plan.clip_low, plan.clip_high, plan.clip_ratio_c if plan.clip_ratio_c is not None else 0.0,
        plan.log_cap, plan.kl_coef, plan.entropy_coef,
        NUM_PARTS=num_parts, NUM_COLS=plan.num_cols, DUAL_CLIP=plan.clip_ratio_c is not None, KL_MODE=plan.kl_mode,
        KL_ST=plan.kl_straight_through,
        KL_IN_LOSS=plan.kl_in_loss, TIS_MODE=plan.tis_code, HAS_IS_W=tokens["is_w"] is not None,
        HAS_ENT=entropy is not None, ENT_IN_LOSS=plan.ent_in_loss,
        RATIO_CLAMP=LOG_RATIO_CLAMP, K3_X_CLAMP=K3_LOG_RATIO_CLAMP, K3_Y_CLAMP=K3_CLAMP, BLOCK=BLOCK,
        num_warps=4,
    )
    return partials.sum(0, dtype=torch.float64), dlogp, dent


class _PolicyLossFunction(torch.autograd.Function):
    """``loss = Σ_p weight_p·agg_p(ℓ)`` from ``logp [N]`` (and ``entropy [N]``); backward scales stored grads."""

    @staticmethod
    def forward(ctx, logp: torch.Tensor, entropy: Optional[torch.Tensor],  # type: ignore[override]
                tokens: dict[str, Optional[torch.Tensor]], plan: LossPlan) -> tuple[torch.Tensor, torch.Tensor]:
        sums, dlogp, dent = _launch(logp, entropy, tokens, plan)
        loss = plan.loss_from_sums(sums).to(logp.dtype)
        ctx.mark_non_differentiable(sums)
        ctx.save_for_backward(dlogp, dent)
        ctx.logp_dtype = logp.dtype
        ctx.ent_dtype = entropy.dtype if entropy is not None else None
        return loss, sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor, grad_sums: Optional[torch.Tensor]  # type: ignore[override]
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], None, None]:
        dlogp, dent = ctx.saved_tensors
        g = grad_loss.to(torch.float32)
        grad_logp = (dlogp * g).to(ctx.logp_dtype) if ctx.needs_input_grad[0] else None
        grad_ent = None
        if ctx.needs_input_grad[1] and dent is not None:
            grad_ent = (dent * g).to(ctx.ent_dtype)
        return grad_logp, grad_ent, None, None


def policy_loss_triton(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                       seq_index: torch.Tensor, num_seqs: int, part_masks: list[torch.Tensor], plan: LossPlan, *,
                       ref_logp: Optional[torch.Tensor] = None, rollout_logp: Optional[torch.Tensor] = None,
                       entropy: Optional[torch.Tensor] = None, is_weights: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy loss of flat token tensors computed by the Triton kernel (``cipo.loss`` prepares the inputs).

    Args:
        logp: ``[N]`` float32/float64 current log-probs; the gradient flows here and, when
            ``plan.ent_in_loss``, into ``entropy``.
        old_logp, advantages: ``[N]`` float, no gradient.
        mask: ``[N]`` bool, the loss tokens; values outside it are never read into the loss (``where``).
        seq_index: ``[N]`` int64 sequence of each token, in ``[0, num_seqs)``.
        part_masks: one ``[N]`` bool mask per part of ``plan`` (each a subset of ``mask``).
        plan: the loss knobs (validated by the caller, as is the presence of ref/rollout/entropy;
            ``plan.kl_estimator`` is set exactly when ``ref_logp`` is given, ``plan.has_entropy`` when ``entropy``
            is).
        ref_logp, rollout_logp, entropy, is_weights: ``[N]`` float, optional.

    Returns:
        ``(loss, sums)``: a 0-dim tensor in ``logp.dtype`` and the float64 column sums (metrics:
        :meth:`LossPlan.metrics`).
    """
    if not part_masks or len(part_masks) != plan.num_parts:
        raise ValueError(f"policy_loss_triton needs one mask per stream part of the plan ({plan.num_parts}); got "
                         f"{len(part_masks)}")
    device = logp.device
    f32 = torch.float32

    def detached(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.detach().contiguous()

    tis = None
    if plan.tis_code == 1:
        tis = detached(rollout_logp)
    elif plan.tis_code == 2:
        tis = seq_log_weight(old_logp, rollout_logp, mask, seq_index, num_seqs, f32)
    tokens = {
        "old": detached(old_logp), "adv": detached(advantages), "mask": mask.contiguous().view(torch.uint8),
        "ref": detached(ref_logp) if plan.kl_mode else None, "tis": tis, "is_w": detached(is_weights),
        "coefs": part_coefficients(plan, [pm.to(device) for pm in part_masks], seq_index, num_seqs, f32),
        "weights": torch.tensor(plan.part_weights, dtype=f32, device=device),
    }
    entropy = entropy.contiguous() if entropy is not None else None
    return _PolicyLossFunction.apply(logp.contiguous(), entropy, tokens, plan)
