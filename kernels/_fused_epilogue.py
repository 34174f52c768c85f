"""The fused loss's Triton epilogue: one kernel that turns a logits tile into the loss terms and ``dL/dz``.

:func:`_fused_epilogue_kernel` works on complete rows of a logits tile (a token chunk ``[C, V]``): sweep 1 over the
row (online max, ``Σ exp``, ``Σ exp·s`` for the entropy, the target logit), then logp, entropy and the per-token
policy terms (:func:`._policy_math.policy_token_terms`, shared with ``policy_loss``) with the partial sums of the
:class:`._loss_plan.LossPlan` columns and ``g_logp, g_ent`` in registers, then sweep 2 writes ``dL/dz`` (in place,
or straight into the half-precision GEMM operand). Its phases are constexpr, so the same kernel also serves the
vocab tiling (terms only, from statistics merged across slabs) and on-policy sequence TIS (statistics first, the
per-sequence weight in torch, then terms + gradient). :func:`launch` runs it; :class:`TokenRows` is what it reads.

Races: a program owns ``BLOCK_R`` rows of the tile and of every per-row buffer and one row of the partial-sum
buffer; it reads each block of its rows before overwriting it; no atomics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ._dispatch import NO_FP_FUSION
from ._loss_plan import LossPlan, seq_log_weight
from .policy_loss_torch import K3_CLAMP, K3_LOG_RATIO_CLAMP, LOG_RATIO_CLAMP

try:
    import triton
    import triton.language as tl

    from ._policy_math import policy_token_terms, store_partial_sums

    HAS_TRITON = True
except ImportError:  # CPU-only installs without triton keep the torch path
    HAS_TRITON = False


@dataclass
class TokenRows:
    """The per-row inputs of the fused loss for the rows it computes (the loss rows after compaction), detached and
    contiguous; ``[R]`` each, in the compute dtype ``dtype`` (fp32; fp64 for fp64 inputs) unless noted."""

    targets: torch.Tensor            # [R] int64
    mask: torch.Tensor               # [R] bool (all True after compaction, unless no compaction happened)
    mask_u8: torch.Tensor            # [R] uint8 view of mask
    seq_index: torch.Tensor          # [R] int64 (original sequence numbers, non-decreasing)
    num_seqs: int
    old: Optional[torch.Tensor]      # None: on-policy (old_logp := logp, detached)
    adv: torch.Tensor
    ref: Optional[torch.Tensor]      # given → kl computed (metric), in the loss when kl_coef > 0
    rollout: Optional[torch.Tensor]
    tis: Optional[torch.Tensor]      # token TIS: rollout; sequence TIS: per-token log-weight (None: deferred)
    coefs: torch.Tensor              # [P, R] aggregation coefficients per part
    weights: torch.Tensor            # [P] float32 part weights on the device
    seq_tis: bool                    # sequence-level TIS is on
    dtype: torch.dtype

    @property
    def on_policy(self) -> bool:
        return self.old is None

    @property
    def deferred(self) -> bool:
        """Sequence TIS on-policy: the weight needs the current log-probs of whole sequences first."""
        return self.seq_tis and self.tis is None

    def rows(self, r0: int, r1: int) -> "TokenRows":
        """Rows ``r0:r1`` (views)."""
        def sl(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t[r0:r1]

        return replace(self, targets=self.targets[r0:r1], mask=self.mask[r0:r1], mask_u8=self.mask_u8[r0:r1],
                       seq_index=self.seq_index[r0:r1], old=sl(self.old), adv=self.adv[r0:r1], ref=sl(self.ref),
                       rollout=sl(self.rollout), tis=sl(self.tis), coefs=self.coefs[:, r0:r1])

    def select(self, index: torch.Tensor) -> "TokenRows":
        """The rows ``index`` (copies, contiguous)."""
        def pick(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.index_select(0, index).contiguous()

        mask = self.mask.index_select(0, index)
        return replace(self, targets=pick(self.targets), mask=mask, mask_u8=mask.view(torch.uint8),
                       seq_index=pick(self.seq_index), old=pick(self.old), adv=pick(self.adv), ref=pick(self.ref),
                       rollout=pick(self.rollout), tis=pick(self.tis),
                       coefs=self.coefs.index_select(1, index).contiguous())

    def with_deferred_tis(self, logp: torch.Tensor) -> "TokenRows":
        """On-policy sequence TIS: fill in the per-token log-weight from the current log-probs (whole sequences)."""
        if not self.deferred:
            return self
        return replace(self, tis=seq_log_weight(logp.to(self.dtype), self.rollout, self.mask, self.seq_index,
                                                self.num_seqs, self.dtype))


@dataclass
class RowStats:
    """Per-row statistics of complete rows: ``[R]`` each, compute dtype."""

    row_max: torch.Tensor
    log_norm: torch.Tensor
    logp: torch.Tensor
    ent: torch.Tensor


if HAS_TRITON:

    @triton.jit
    def _fused_epilogue_kernel(
        z_ptr, stride_z, dz_ptr, stride_dz, n_rows, n_cols, inv_temp,
        tgt_ptr, mask_ptr, old_ptr, adv_ptr, ref_ptr, tis_ptr, coef_ptr, coef_stride, pw_ptr,
        max_ptr, lognorm_ptr, logp_ptr, ent_ptr, glogp_ptr, gent_ptr, partial_ptr,
        clip_low, clip_high, clip_c, log_cap, kl_coef, ent_coef,
        STATS: tl.constexpr, STORE_STATS: tl.constexpr, TERMS: tl.constexpr, GRAD: tl.constexpr,
        ON_POLICY: tl.constexpr,
        NUM_PARTS: tl.constexpr, NUM_COLS: tl.constexpr, DUAL_CLIP: tl.constexpr, KL_MODE: tl.constexpr,
        KL_ST: tl.constexpr, KL_IN_LOSS: tl.constexpr, TIS_MODE: tl.constexpr, ENT_IN_LOSS: tl.constexpr,
        RATIO_CLAMP: tl.constexpr, K3_X_CLAMP: tl.constexpr, K3_Y_CLAMP: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One program = ``BLOCK_R`` complete rows. Phases (constexpr):

        * ``STATS``: sweep 1 over ``z [n_rows, n_cols]`` → row max, log-normaliser, logp, entropy (else they are
          loaded from ``max/lognorm/logp/ent_ptr``); ``STORE_STATS`` (= ``STATS`` without ``TERMS``) stores them.
        * ``TERMS``: per-token terms, partial sums into row ``pid`` of ``partial_ptr`` and ``g_logp, g_ent``
          (stored to ``glogp/gent_ptr`` when not ``GRAD``).
        * ``GRAD``: sweep 2 writes ``dL/dz`` to ``dz_ptr`` (may alias ``z_ptr``: each block is read first).
        """
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        m_tok = (tl.load(mask_ptr + rows, mask=rmask, other=0) != 0) & rmask
        tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-100)
        zrow = z_ptr + rows.to(tl.int64) * stride_z
        if STATS:
            # Sweep 1: online max / Σexp / Σexp·(s − max), rows outside the loss are not read at all.
            mx = tl.full([BLOCK_R], -3.0e38, tl.float32)
            d = tl.zeros([BLOCK_R], dtype=tl.float32)
            a = tl.zeros([BLOCK_R], dtype=tl.float32)
            for v0 in range(0, n_cols, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                lm = m_tok[:, None] & (cols < n_cols)[None, :]
                s = tl.load(zrow[:, None] + cols[None, :], mask=lm, other=float("-inf")).to(tl.float32) * inv_temp
                m_new = tl.maximum(mx, tl.max(s, axis=1))
                rescale = tl.exp(mx - m_new)
                sh = s - m_new[:, None]
                e = tl.exp(sh)  # 0 where masked (sh = -inf)
                a = rescale * (a + (mx - m_new) * d) + tl.sum(e * tl.where(lm, sh, 0.0), axis=1)
                d = d * rescale + tl.sum(e, axis=1)
                mx = m_new
            hit = m_tok & (tgt != -100)
            s_t = tl.load(zrow + tl.where(hit, tgt, 0), mask=hit, other=0.0).to(tl.float32) * inv_temp
            d = tl.where(m_tok, d, 1.0)  # rows not read: log_norm 0, entropy 0 (never used, kept finite)
            log_d = tl.log(d)
            # (s_t − max) − log d, never s_t − lse: at |s| ~ 1e4 rounding lse would put ~1e-3 into logp.
            logp = tl.where(hit, (s_t - mx) - log_d, 0.0)
            ent = tl.where(m_tok, log_d - a / d, 0.0)
            if STORE_STATS:
                tl.store(max_ptr + rows, mx, mask=rmask)
                tl.store(lognorm_ptr + rows, log_d, mask=rmask)
                tl.store(logp_ptr + rows, logp, mask=rmask)
                tl.store(ent_ptr + rows, ent, mask=rmask)
        else:
            mx = tl.load(max_ptr + rows, mask=rmask, other=0.0)
            log_d = tl.load(lognorm_ptr + rows, mask=rmask, other=0.0)
            logp = tl.load(logp_ptr + rows, mask=rmask, other=0.0)
            ent = tl.load(ent_ptr + rows, mask=rmask, other=0.0)
        if TERMS:
            if ON_POLICY:
                old = logp  # old_logp := logp, detached: the ratio is exactly 1
            else:
                old = tl.load(old_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            adv = tl.load(adv_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            ref = logp
            if KL_MODE != 0:
                ref = tl.load(ref_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            tis_in = logp
            if TIS_MODE != 0:
                tis_in = tl.load(tis_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            pg, kl, dl, nlr, clipped, clipped_lower, tis_capped = policy_token_terms(
                logp, old, adv, m_tok, ref, tis_in, logp, clip_low, clip_high, clip_c, log_cap, kl_coef,
                DUAL_CLIP, KL_MODE, KL_ST, KL_IN_LOSS, TIS_MODE, False, RATIO_CLAMP, K3_X_CLAMP, K3_Y_CLAMP,
            )
            # Every column is written (the partial-sum buffer is not zero-filled).
            c_total = store_partial_sums(
                partial_ptr + pid * NUM_COLS, coef_ptr, coef_stride, rows, rmask, pw_ptr, m_tok, pg, kl,
                tl.where(m_tok, ent, 0.0), nlr, clipped, clipped_lower, tis_capped, NUM_PARTS, True, True, True,
            )
            g_logp = c_total * dl
            g_ent = tl.zeros([BLOCK_R], dtype=tl.float32)
            if ENT_IN_LOSS:
                g_ent = tl.where(m_tok, -ent_coef * c_total, 0.0)
            if GRAD:
                # Sweep 2: rows with a zero gradient (outside the loss, zero advantage) are written, not read.
                live = m_tok & ((g_logp != 0.0) | (g_ent != 0.0))
                dzrow = dz_ptr + rows.to(tl.int64) * stride_dz
                for v0 in range(0, n_cols, BLOCK_V):
                    cols = v0 + tl.arange(0, BLOCK_V)
                    cm = (cols < n_cols)[None, :]
                    lm = live[:, None] & cm
                    z = tl.load(zrow[:, None] + cols[None, :], mask=lm, other=0.0).to(tl.float32)
                    lp = tl.where(lm, (z * inv_temp - mx[:, None]) - log_d[:, None], 0.0)
                    pr = tl.where(lm, tl.exp(lp), 0.0)
                    onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
                    dz = g_logp[:, None] * (onehot - pr)
                    if ENT_IN_LOSS:
                        dz = dz - g_ent[:, None] * pr * (lp + ent[:, None])
                    dz = tl.where(lm, dz * inv_temp, 0.0)
                    tl.store(dzrow[:, None] + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
                             mask=rmask[:, None] & cm)
            else:
                tl.store(glogp_ptr + rows, g_logp, mask=rmask)
                tl.store(gent_ptr + rows, g_ent, mask=rmask)



def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def tile_blocks(n_rows: int, n_cols: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps) for the tile phases. GPU: one row per program (384 programs per chunk at
    V = 151936), 4096-wide fp32 blocks at 8 warps. Interpreter: its cost grows with the op count: ~64K-element
    blocks."""
    if on_gpu:
        block_v = min(4096, _next_pow2(n_cols))
        return 1, block_v, 8 if block_v >= 2048 else 4
    block_v = min(16384, _next_pow2(n_cols))
    return min(_next_pow2(n_rows), max(1, 65536 // block_v)), block_v, 4


#: Rows per program of the tile-free phase (terms only, vocab tiling): an elementwise pass.
TERMS_BLOCK = 1024


def launch(k: TokenRows, plan: LossPlan, phase: tuple[bool, bool, bool], *, z: Optional[torch.Tensor] = None,
           dz: Optional[torch.Tensor] = None, stats: Optional[RowStats] = None,
           g_out: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Optional[torch.Tensor]:
    """Run :func:`_fused_epilogue_kernel` on rows ``k`` in phase ``(STATS, TERMS, GRAD)``.

    ``z``: the logits tile ``[R, V]`` (phases with ``STATS`` or ``GRAD``); ``dz``: where ``dL/dz`` goes (may be
    ``z``); ``stats``: row statistics to store (``STATS`` alone) or to load (no ``STATS``); ``g_out``: where
    ``g_logp, g_ent`` go when ``TERMS`` runs without ``GRAD``. Returns the ``[plan.num_cols]`` float64 column sums
    of the partial sums when ``TERMS``, else None.
    """
    do_stats, do_terms, do_grad = phase
    n_rows = k.targets.numel()
    device = k.targets.device
    if n_rows == 0:
        return torch.zeros(plan.num_cols, dtype=torch.float64, device=device) if do_terms else None
    if z is not None:
        n_cols = z.shape[1]
        block_r, block_v, warps = tile_blocks(n_rows, n_cols, z.is_cuda)
    else:  # terms only: an elementwise pass over the rows
        n_cols, block_r, block_v, warps = 0, TERMS_BLOCK, 16, 4
    grid = (triton.cdiv(n_rows, block_r),)
    partials = torch.empty(grid[0], plan.num_cols, dtype=torch.float32, device=device) if do_terms else None
    dummy = k.adv  # stands in for absent buffers; never touched (its constexpr branch is compiled out)
    st = stats
    _fused_epilogue_kernel[grid](
        z if z is not None else dummy, z.stride(0) if z is not None else 0,
        dz if dz is not None else dummy, dz.stride(0) if dz is not None else 0,
        n_rows, n_cols, plan.inv_temp,
        k.targets, k.mask_u8, k.old if k.old is not None else dummy, k.adv,
        k.ref if k.ref is not None else dummy, k.tis if k.tis is not None else dummy,
        k.coefs, k.coefs.stride(0), k.weights,
        st.row_max if st is not None else dummy, st.log_norm if st is not None else dummy,
        st.logp if st is not None else dummy, st.ent if st is not None else dummy,
        g_out[0] if g_out is not None else dummy, g_out[1] if g_out is not None else dummy,
        partials if partials is not None else dummy,
        plan.clip_low, plan.clip_high, plan.clip_ratio_c if plan.clip_ratio_c is not None else 0.0, plan.log_cap,
        plan.kl_coef, plan.entropy_coef,
        STATS=do_stats, STORE_STATS=do_stats and not do_terms, TERMS=do_terms, GRAD=do_grad,
        ON_POLICY=k.on_policy, NUM_PARTS=plan.num_parts, NUM_COLS=plan.num_cols,
        DUAL_CLIP=plan.clip_ratio_c is not None, KL_MODE=plan.kl_mode, KL_ST=plan.kl_straight_through,
        KL_IN_LOSS=plan.kl_in_loss,
        TIS_MODE=plan.tis_code, ENT_IN_LOSS=plan.ent_in_loss, RATIO_CLAMP=LOG_RATIO_CLAMP,
        K3_X_CLAMP=K3_LOG_RATIO_CLAMP, K3_Y_CLAMP=K3_CLAMP, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps,
        **NO_FP_FUSION,
    )  # fmt: skip
    return partials.sum(0, dtype=torch.float64) if do_terms else None
