"""Torch path of ``fused_linear_policy_loss`` (the CPU path, float64-capable): the same contract as the Triton
epilogue of :mod:`._fused_epilogue`, on a token chunk or on the per-token terms of the vocab tiling.

The per-token values come from the policy loss's torch path (:func:`.policy_loss_torch.token_terms`) and their
derivatives from autograd of ``Σ c·ℓ`` — that path's own tie conventions, which the Triton helper
:func:`._policy_math.policy_token_terms` reproduces. The end-to-end float64 reference the tests hold this module to
(``[T, V]`` logits → log-softmax → gather → ``cipo_policy_loss``) is ``cipo.fused_loss_ref``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._fused_epilogue import TokenRows
from ._loss_plan import LossPlan
from .linear_logprob_torch import IGNORE_INDEX
from .policy_loss_torch import token_terms


def terms_torch(logp: torch.Tensor, ent: torch.Tensor, k: TokenRows, plan: LossPlan
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Per-token terms in torch: ``(g_logp [R], g_ent [R] | None, column sums [plan.num_cols] float64)``.

    The values come from ``policy_loss_torch.token_terms``, the derivatives from autograd of ``Σ c·ℓ`` — that
    function's own tie conventions.
    """
    dt = k.dtype
    mask = k.mask
    zero = torch.zeros((), dtype=dt, device=logp.device)
    with torch.enable_grad():
        lp = logp.detach().to(dt).requires_grad_(True)
        en = ent.detach().to(dt).requires_grad_(plan.ent_in_loss)
        lp_c = torch.where(mask, lp, zero)  # clean, as cipo.loss.flatten_inputs does: no NaN derivative can leak
        old = lp_c.detach() if k.on_policy else k.old
        # token_terms' own per-token terms; TIS is applied below from the precomputed log-weight
        # (token_terms would re-sum it over the chunk's sequences, which need not be whole here).
        terms = token_terms(lp_c, old, k.adv, mask, k.seq_index, k.num_seqs, clip_ratio_low=plan.clip_ratio_low,
                            clip_ratio_high=plan.clip_ratio_high, clip_ratio_c=plan.clip_ratio_c,
                            kl_estimator=plan.kl_estimator,
                            tis_mode=None, tis_cap=1.0, ref_logp=k.ref)
        pg = terms.pg
        clipped, clipped_lower = terms.clipped, terms.clipped_lower
        tis_capped = None
        if plan.tis_code:
            if plan.tis_code == 1:
                log_w = torch.where(mask, old - k.tis, zero).detach()
            else:
                log_w = k.tis
            tis_capped = log_w > plan.log_cap
            pg = pg * torch.exp(torch.clamp(log_w, max=plan.log_cap))
        pg = torch.where(mask, pg, zero)
        kl = torch.where(mask, terms.kl, zero) if terms.kl is not None else None
        ent_m = torch.where(mask, en, zero)
        c_total = None
        for p, weight in enumerate(plan.part_weights):
            term = k.coefs[p] * weight
            c_total = term if c_total is None else c_total + term
        objective = pg
        if plan.kl_in_loss:
            objective = objective + plan.kl_coef * kl
        if plan.ent_in_loss:
            objective = objective - plan.entropy_coef * ent_m
        inputs = [lp, en] if plan.ent_in_loss else [lp]
        grads = torch.autograd.grad((c_total * objective).sum(), inputs, allow_unused=True)
    g_logp = grads[0] if grads[0] is not None else torch.zeros_like(lp)
    g_ent = None
    if plan.ent_in_loss:
        g_ent = grads[1] if grads[1] is not None else torch.zeros_like(en)
    cols = []
    f64 = torch.float64
    for p in range(plan.num_parts):
        c = k.coefs[p]
        cols.append(torch.sum(c * pg.detach(), dtype=f64))
        cols.append(torch.sum(c * kl.detach(), dtype=f64) if kl is not None else torch.zeros((), dtype=f64,
                                                                                           device=c.device))
        cols.append(torch.sum(c * ent_m.detach(), dtype=f64))
    cols += [
        mask.sum().to(f64),
        (clipped & mask).sum().to(f64),
        (clipped_lower & mask).sum().to(f64),
        torch.where(mask, terms.neg_log_ratio.detach(), zero).sum(dtype=f64),
        (tis_capped & mask).sum().to(f64) if tis_capped is not None else torch.zeros((), dtype=f64,
                                                                                      device=mask.device),
    ]
    return g_logp.detach(), None if g_ent is None else g_ent.detach(), torch.stack(cols)


def token_epilogue_torch(z: torch.Tensor, k: TokenRows, plan: LossPlan, grad: bool, dz: Optional[torch.Tensor]
                         ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The torch epilogue of one token chunk: the rows are complete and the tile is ours, so it is shifted in place
    and ``exp`` is taken once (``p = e / d`` reuses it). Temporaries: one tile (``e``), plus an fp32 copy for half
    tiles. Same formulas as ``linear_logprob``'s epilogues."""
    s = z if z.dtype == k.dtype else z.to(k.dtype)
    inv_temp = plan.inv_temp
    if inv_temp != 1.0:
        s.mul_(inv_temp)
    row_max = s.amax(dim=1)
    s.sub_(row_max[:, None])  # s − max ≤ 0
    e = torch.exp(s)
    d = e.sum(dim=1)
    dot = torch.bmm(e.unsqueeze(1), s.unsqueeze(2)).view(-1)  # Σ e·(s − max), no further tile
    log_d = torch.log(d)
    valid = k.targets != IGNORE_INDEX
    rows = torch.arange(s.shape[0], device=s.device)
    cols = k.targets.clamp(min=0)
    logp = torch.where(valid, s[rows, cols] - log_d, 0.0)  # (s_t − max) − log d
    ent = log_d - dot / d
    k = k.with_deferred_tis(logp)
    g_logp, g_ent, sums = terms_torch(logp, ent, k, plan)
    if not grad:
        return sums, None
    p = e.div_(d[:, None])
    coef_logp = (g_logp * -inv_temp)[:, None]
    if g_ent is not None:
        # s ← −(g_ent/T)·p·(log p + H) − (g_logp/T)·p, with log p = (s − max) − log d
        s.sub_(log_d[:, None]).add_(ent[:, None]).mul_(p).mul_((g_ent * -inv_temp)[:, None])
        s.addcmul_(p, coef_logp)
    else:
        torch.mul(p, coef_logp, out=s)
    s[rows, cols] += torch.where(valid, g_logp * inv_temp, 0.0)
    out = dz if dz is not None else z
    if s.data_ptr() != out.data_ptr():
        out.copy_(s)
    return sums, out
