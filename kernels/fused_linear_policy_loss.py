"""Fused LM head + CIPO policy loss: hidden states and the head weight in, loss and finished gradients out.

``fused_linear_policy_loss(hidden [T, H], weight [V, H], batch, config, ...)`` equals
``cipo_policy_loss(logp, batch, config, entropy=entropy, ...)`` with ``logp, entropy`` the per-token
log-prob and entropy of ``softmax(hidden @ weight.T / temperature)`` — gradients w.r.t. ``hidden`` and ``weight``
included — without ever holding the ``[T, V]`` logits.

Why the gradient can be finished in the forward
-----------------------------------------------
Every aggregation mode is linear in the per-token values (``agg_p(v) = Σ_t c_p[t]·v_t``, coefficients from
:func:`.policy_loss_ref.token_coefficients`), and a token's loss ``ℓ_t = pg_t·w_t + β·kl_t − γ·H_t`` depends only
on its own ``logp_t``, its own entropy ``H_t`` and constants known before the pass (advantage, old/ref/rollout
log-probs, the truncated-IS weight, the coefficients). So with ``c_t = Σ_p λ_p·c_p[t]`` (λ = 1 for the base
stream, ``lambda_corr`` for the correction stream) the upstream gradients are
``g_logp_t = c_t·dℓ_t/dlogp_t`` and ``g_ent_t = −γ·c_t``, and

    dL/dz_tj = (1/T)·[g_logp_t·(1[j = target_t] − p_tj) − g_ent_t·p_tj·(log p_tj + H_t)]

(the softmax gradient of ``linear_logprob``). The autograd backward only scales the stored ``dH``, ``dW`` by the
incoming scalar.

Two tilings (the drivers of ``_chunking``; ``tiling=`` forces one)
------------------------------------------------------------------
* **token chunks** — ``6·T·H·V`` FLOPs (the floor). Per chunk of ``C`` rows: ``z = h_c @ W.T`` (``[C, V]``,
  complete rows), then ONE epilogue (Triton: one kernel, one program per row block) does sweep 1 over the row —
  online max, ``Σ exp``, ``Σ exp·s`` (entropy), target logit — then logp, entropy, ratio, clip, dual-clip, TIS,
  KL, the per-token loss sums and ``g_logp, g_ent`` in registers, then sweep 2 writes ``dL/dz`` (in place, or
  straight into the half-precision GEMM operand). Then ``dH[rows] = dZ @ W`` and ``dW += dZᵀ @ h_c``. Extra
  memory: the tile (``C × V``) and an fp32 ``dW`` accumulator ``V × H`` (2.32 GiB at V = 151936, H = 4096; none
  when everything fits one chunk; none with ``dw_accum="weight"``, which accumulates in the weight dtype).
* **vocab slabs** — ``8·T·H·V``. Pass 1 over slabs ``[T, Vb]`` merges online row statistics
  (``linear_logprob.update_row_stats_``); the per-token terms then run once over ``[T]`` (the same kernel, terms
  only); pass 2 recomputes every slab with the *same* GEMM calls (bit-identical logits), writes ``dL/dz``
  (``linear_logprob.softmax_grad_``), forms ``dW[slab] = dZᵀ @ h`` once and accumulates ``dH`` (fp32 ``T × H``:
  128 MiB at T = 8192, H = 4096).

``tiling=None`` picks token chunks when the tile (fp32 logits + the half GEMM operand) and, when ``dW`` is summed in
fp32 over several chunks, its ``V × H`` fp32 accumulator fit :data:`MEMORY_BUDGET_BYTES` (1.5 GiB), else the tiling
with the smaller accumulator (``smaller_accumulator_axis``): with an fp32 sum on GPU at V = 151936 that is vocab
slabs for H ≥ 2048.

With ``dw_accum="auto"`` (the default) half weights on CUDA sum ``dW`` in the weight dtype, so token chunks fit the
budget at any shape (chunks of up to 2048 rows, :func:`_weight_accum_chunk_rows`); fp32 sums keep the rule above.

Measured on an H100 (bf16, V = 151936; bench/results/h100-2026-11-26, tiling study with device time per kernel): at
T = 8192, H = 4096 the bare LM-head matmul forward + backward takes 38 ms of device time; token chunks with the
weight-dtype sum 48-49 ms (three GEMMs of ~13-15 ms, the epilogue 4.3 ms: two reads of the fp32 tile and a bf16
write at ~2.9 TB/s, the final scaling by the incoming gradient 1.9 ms); vocab slabs 69 ms (five GEMM-sized
passes); token chunks with an fp32 sum 71 ms at 1024 rows and 137 ms at 384 rows — ``torch.mm`` with an fp32
output followed by ``add_`` re-reads and re-writes the fp32 ``V × H`` accumulator (20-54 ms of elementwise
traffic), which is why the fp32 sum loses on GPU. Changed since, not yet measured: the first chunk's GEMM writes
``dW`` (no zero fill and no read of zeros, ~0.8 ms predicted) and the scaling is one vectorised multi-tensor
multiply (~1 ms predicted). What remains above the matmul — the fp32 logits write, the epilogue's two reads of the
tile, the ``beta = 1`` reads of ``dW`` — would need the statistics computed inside the logits GEMM (a fused
GEMM + online-softmax kernel, as Cut Cross-Entropy does) to go further.

Cost (``R`` loss rows, ``C`` rows per chunk, ``Vb`` columns per slab, ``b`` bytes per input element; the tile is
``plan_chunks``' budget: 256 MiB of fp32 on CUDA, 64 MiB on CPU, or ``chunk_tokens × V`` elements):

=============  ==========  ================================================================================
tiling         FLOPs       extra memory besides the returned gradients
=============  ==========  ================================================================================
token chunks   6·R·H·V     tile ``C·V·4`` (+ ``C·V·b`` half GEMM operand on CUDA) + fp32 ``dW`` accumulator
                           ``V·H·4`` (0 for one chunk or ``dw_accum="weight"``) + gathered hidden ``R·H·b``
                           (only when compacting) + ``O(R)``; torch epilogue: + one tile (``exp``) and, for
                           half tiles, an fp32 copy
vocab slabs    8·R·H·V     tile ``R·Vb·4`` (+ ``R·Vb·b``) + fp32 ``dH`` accumulator ``R·H·4`` + its cast
                           ``R·H·b`` + gathered hidden ``R·H·b`` (when compacting) + ``O(R)``; torch
                           epilogues (``linear_logprob``'s): up to two tile-sized temporaries
=============  ==========  ================================================================================

Further choices
---------------
* **Only loss rows are computed.** Rows outside ``batch.loss_mask`` (prompt tokens, the last token of each
  sequence) contribute nothing to the loss or to any metric, so when they are more than 10 % of the rows
  (:data:`COMPACT_BELOW`) the loss rows' hidden states are gathered (``index_select``, an ``[R, H]`` copy) before
  the GEMMs and ``dH`` is 0 elsewhere: the FLOPs scale with the number of loss tokens ``R``, not ``T``. Otherwise
  the few non-loss rows go through the GEMMs, the Triton epilogue does not read them, and their ``dL/dz`` is 0.
* **Entropy is always computed** (one more running sum in sweep 1) and reported as the ``entropy`` metric, as
  ``cipo_policy_loss`` does when given the entropy; it enters the loss and the gradient only when
  ``config.entropy_coef > 0``.
* **On-policy** (``batch.old_logp is None``): ``old_logp := logp`` (detached), so the ratio is exactly 1. With
  sequence-level TIS the weight then depends on the whole sequence's current log-probs: token chunks are cut on
  sequence boundaries and the epilogue is split in two launches (statistics; the per-sequence log-weight in
  torch; terms + gradient) — or, if a sequence is longer than a chunk, the auto rule takes vocab slabs, where
  all log-probs are known before any gradient.
* Rows whose gradient is exactly zero (zero advantage, nothing else in the loss: equal-reward groups) are not
  read in sweep 2; zeros are written.
* Precision: fp32 math (fp64 for fp64 inputs, torch path). Logits tiles are fp32 on CUDA for half inputs
  (``torch.mm(out_dtype=float32)``), in the input dtype elsewhere — as in ``linear_logprob``. Saved statistics
  are the row max and ``log Σ exp(s − max)`` separately (at |logit| 1e4 their fp32 sum loses the normaliser).
  Per-program partial sums are fp32, summed across programs and chunks in float64.

Implementations: the Triton epilogue :func:`_fused_epilogue_kernel` (CUDA, or CPU tensors under
``CIPO_FORCE_TRITON=1`` with ``TRITON_INTERPRET=1``) and a chunked torch epilogue with the same memory bound (the
CPU path; fp64 always takes it). Its per-token math is :func:`._policy_math.policy_token_terms`, the
``@triton.jit`` helper that ``policy_loss._policy_loss_fwd_kernel`` calls too (one copy of the formulas and tie
conventions; the tests pin both kernels against the same reference). Races: a program owns ``BLOCK_R`` rows of
the tile and of every per-row buffer and one row of the partial-sum buffer; it reads each block of its rows
before overwriting it; no atomics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

import torch
from torch.autograd.function import once_differentiable

from ..advantages import group_advantages
from ..packing import BASE_STREAM, CORRECTION_STREAM, PackedBatch
from ._chunking import (
    ChunkPlan,
    accum_dtype,
    addmm_acc_,
    logits_dtype,
    logits_tile,
    plan_chunks,
    smaller_accumulator_axis,
    tile_view,
    vocab_slab_pass,
)
from ._dispatch import NO_FP_FUSION, use_triton
from .linear_logprob import IGNORE_INDEX, OnlineRowStats, softmax_grad_, update_row_stats_
from .policy_loss_ref import (
    K3_CLAMP,
    K3_LOG_RATIO_CLAMP,
    LOG_RATIO_CLAMP,
    part_losses,
    token_coefficients,
    token_terms,
)

if TYPE_CHECKING:
    from ..config import PolicyLossConfig

try:
    import triton
    import triton.language as tl

    from ._policy_math import policy_token_terms

    HAS_TRITON = True
except ImportError:  # CPU-only installs without triton keep the torch path
    HAS_TRITON = False

__all__ = ["MEMORY_BUDGET_BYTES", "fused_linear_policy_loss"]

#: Extra-memory budget the automatic tiling choice respects (the issue's target on GPU).
MEMORY_BUDGET_BYTES = int(1.5 * 2**30)

#: Study knob of the GPU tiling benchmark (bench/loss_suite.py), not an API: token-chunk logits tiles in the input
#: dtype (half: the precision of torch's own bf16 path and of Liger's fused cross-entropy) instead of fp32, with
#: ``dL/dz`` written in place — half the tile's bytes and epilogue traffic. Off by default.
_HALF_TILES_FOR_STUDY = False

_KL_CODE = {"k1": 1, "k2": 2, "k3": 3, "abs": 4}
_TIS_CODE = {None: 0, "token": 1, "sequence": 2}
_NUM_PARTS = 2  # base, correction
# Partial-sum columns: 3 per part (pg, kl, entropy), then the metric counts (as in policy_loss).
_COL_COUNT, _COL_CLIPPED, _COL_CLIPPED_LOWER, _COL_NEG_LOG_RATIO, _COL_TIS_CAPPED = range(5)
_NUM_COLS = 3 * _NUM_PARTS + 5


# ---------------------------------------------------------------------------------------------------------------
# Triton: the fused epilogue (per-token policy terms: ._policy_math)
# ---------------------------------------------------------------------------------------------------------------

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
        KL_IN_LOSS: tl.constexpr, TIS_MODE: tl.constexpr, ENT_IN_LOSS: tl.constexpr,
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
                DUAL_CLIP, KL_MODE, KL_IN_LOSS, TIS_MODE, False, RATIO_CLAMP, K3_X_CLAMP, K3_Y_CLAMP,
            )
            ent_m = tl.where(m_tok, ent, 0.0)
            prow = partial_ptr + pid * NUM_COLS
            c_total = tl.zeros([BLOCK_R], dtype=tl.float32)
            for p in tl.static_range(NUM_PARTS):
                c = tl.load(coef_ptr + p * coef_stride + rows, mask=rmask, other=0.0)
                c_total += tl.load(pw_ptr + p) * c
                tl.store(prow + 3 * p, tl.sum(c * pg, axis=0))
                tl.store(prow + 3 * p + 1, tl.sum(c * kl, axis=0))
                tl.store(prow + 3 * p + 2, tl.sum(c * ent_m, axis=0))
            met = prow + 3 * NUM_PARTS
            tl.store(met + 0, tl.sum(tl.where(m_tok, 1.0, 0.0), axis=0))
            tl.store(met + 1, tl.sum(tl.where(clipped, 1.0, 0.0), axis=0))
            tl.store(met + 2, tl.sum(tl.where(clipped_lower, 1.0, 0.0), axis=0))
            tl.store(met + 3, tl.sum(nlr, axis=0))
            tl.store(met + 4, tl.sum(tl.where(tis_capped, 1.0, 0.0), axis=0))
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


def _tile_blocks(n_rows: int, n_cols: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps) for the tile phases. GPU: one row per program (384 programs per chunk at
    V = 151936), 4096-wide fp32 blocks at 8 warps. Interpreter: its cost grows with the op count: ~64K-element
    blocks."""
    if on_gpu:
        block_v = min(4096, _next_pow2(n_cols))
        return 1, block_v, 8 if block_v >= 2048 else 4
    block_v = min(16384, _next_pow2(n_cols))
    return min(_next_pow2(n_rows), max(1, 65536 // block_v)), block_v, 4


#: Rows per program of the tile-free phase (terms only, vocab tiling): an elementwise pass.
_TERMS_BLOCK = 1024


# ---------------------------------------------------------------------------------------------------------------
# Per-token constants of one call
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Consts:
    """Everything the epilogue needs besides the logits, for the (compacted) rows, detached and contiguous.

    Token tensors are ``[R]`` in the compute dtype ``dtype`` (fp32; fp64 for fp64 inputs) unless noted.
    """

    targets: torch.Tensor            # [R] int64
    mask: torch.Tensor               # [R] bool (all True after compaction, unless no compaction happened)
    mask_u8: torch.Tensor            # [R] uint8 view of mask
    seq_index: torch.Tensor          # [R] int64 (original sequence numbers)
    num_seqs: int
    old: Optional[torch.Tensor]      # None: on-policy
    adv: torch.Tensor
    ref: Optional[torch.Tensor]      # given → kl computed (metric), in the loss when kl_coef > 0
    rollout: Optional[torch.Tensor]
    tis: Optional[torch.Tensor]      # token TIS: rollout; sequence TIS: per-token log-weight (None: deferred)
    coefs: torch.Tensor              # [2, R] aggregation coefficients per part
    part_weights: list[float]        # [1, λ]
    weights_t: torch.Tensor          # [2] float32 on device
    inv_temp: float
    eps_low: float                   # ε_low (config.clip_ratio_low)
    eps_high: float                  # ε_high
    clip_low: float                  # 1 − ε_low
    clip_high: float                 # 1 + ε_high
    clip_c: Optional[float]
    log_cap: float
    kl_coef: float
    ent_coef: float
    kl_mode: int
    kl_estimator: Optional[str]
    kl_in_loss: bool
    tis_mode: int
    ent_in_loss: bool
    dtype: torch.dtype

    @property
    def on_policy(self) -> bool:
        return self.old is None

    @property
    def deferred(self) -> bool:
        """Sequence TIS on-policy: the weight needs the current log-probs of whole sequences first."""
        return self.tis_mode == 2 and self.tis is None

    def rows(self, r0: int, r1: int) -> "_Consts":
        """The constants of rows ``r0:r1`` (views)."""
        def sl(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t[r0:r1]

        return replace(self, targets=self.targets[r0:r1], mask=self.mask[r0:r1], mask_u8=self.mask_u8[r0:r1],
                       seq_index=self.seq_index[r0:r1], old=sl(self.old), adv=self.adv[r0:r1], ref=sl(self.ref),
                       rollout=sl(self.rollout), tis=sl(self.tis), coefs=self.coefs[:, r0:r1])


def _seq_log_weight(log_ratio: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor, num_seqs: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Per-token sequence-TIS log-weight: the masked per-sequence sum of ``log_ratio`` (float64), gathered back."""
    delta = torch.where(mask, log_ratio.double(), 0.0)
    sums = torch.zeros(num_seqs, dtype=torch.float64, device=log_ratio.device).index_add_(0, seq_index, delta)
    return sums[seq_index].to(dtype).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Epilogues: Triton and torch, same contract
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _RowStats:
    """Per-row statistics of complete rows: ``[R]`` each, compute dtype."""

    row_max: torch.Tensor
    log_norm: torch.Tensor
    logp: torch.Tensor
    ent: torch.Tensor


def _launch(k: _Consts, phase: tuple[bool, bool, bool], *, z: Optional[torch.Tensor] = None,
            dz: Optional[torch.Tensor] = None, stats: Optional[_RowStats] = None,
            g_out: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Optional[torch.Tensor]:
    """Run :func:`_fused_epilogue_kernel` on rows ``k`` in phase ``(STATS, TERMS, GRAD)``.

    Returns the ``[NUM_COLS]`` float64 column sums of the partial sums when ``TERMS``, else None.
    """
    do_stats, do_terms, do_grad = phase
    n_rows = k.targets.numel()
    device = k.targets.device
    if n_rows == 0:
        return torch.zeros(_NUM_COLS, dtype=torch.float64, device=device) if do_terms else None
    if z is not None:
        n_cols = z.shape[1]
        block_r, block_v, warps = _tile_blocks(n_rows, n_cols, z.is_cuda)
    else:  # terms only: an elementwise pass over the rows
        n_cols, block_r, block_v, warps = 0, _TERMS_BLOCK, 16, 4
    grid = (triton.cdiv(n_rows, block_r),)
    partials = torch.empty(grid[0], _NUM_COLS, dtype=torch.float32, device=device) if do_terms else None
    dummy = k.adv  # stands in for absent buffers; never touched (its constexpr branch is compiled out)
    st = stats
    _fused_epilogue_kernel[grid](
        z if z is not None else dummy, z.stride(0) if z is not None else 0,
        dz if dz is not None else dummy, dz.stride(0) if dz is not None else 0,
        n_rows, n_cols, k.inv_temp,
        k.targets, k.mask_u8, k.old if k.old is not None else dummy, k.adv,
        k.ref if k.ref is not None else dummy, k.tis if k.tis is not None else dummy,
        k.coefs, k.coefs.stride(0), k.weights_t,
        st.row_max if st is not None else dummy, st.log_norm if st is not None else dummy,
        st.logp if st is not None else dummy, st.ent if st is not None else dummy,
        g_out[0] if g_out is not None else dummy, g_out[1] if g_out is not None else dummy,
        partials if partials is not None else dummy,
        k.clip_low, k.clip_high, k.clip_c if k.clip_c is not None else 0.0, k.log_cap, k.kl_coef, k.ent_coef,
        STATS=do_stats, STORE_STATS=do_stats and not do_terms, TERMS=do_terms, GRAD=do_grad,
        ON_POLICY=k.on_policy, NUM_PARTS=_NUM_PARTS, NUM_COLS=_NUM_COLS, DUAL_CLIP=k.clip_c is not None,
        KL_MODE=k.kl_mode, KL_IN_LOSS=k.kl_in_loss,
        TIS_MODE=k.tis_mode, ENT_IN_LOSS=k.ent_in_loss, RATIO_CLAMP=LOG_RATIO_CLAMP, K3_X_CLAMP=K3_LOG_RATIO_CLAMP,
        K3_Y_CLAMP=K3_CLAMP, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps, **NO_FP_FUSION,
    )  # fmt: skip
    return partials.sum(0, dtype=torch.float64) if do_terms else None


def _terms_torch(logp: torch.Tensor, ent: torch.Tensor, k: _Consts
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Per-token terms in torch: ``(g_logp [R], g_ent [R] | None, column sums [NUM_COLS] float64)``.

    The values come from the reference (``policy_loss_ref.token_terms``), the derivatives from autograd of
    ``Σ c·ℓ`` — the reference's own tie conventions.
    """
    dt = k.dtype
    mask = k.mask
    zero = torch.zeros((), dtype=dt, device=logp.device)
    with torch.enable_grad():
        lp = logp.detach().to(dt).requires_grad_(True)
        en = ent.detach().to(dt).requires_grad_(k.ent_in_loss)
        lp_c = torch.where(mask, lp, zero)  # clean, as flatten_inputs does: no NaN derivative can leak
        old = lp_c.detach() if k.on_policy else k.old
        # The reference's own per-token terms; TIS is applied below from the precomputed log-weight (the
        # reference would re-sum it over the chunk's sequences, which need not be whole here).
        terms = token_terms(lp_c, old, k.adv, mask, k.seq_index, k.num_seqs, clip_ratio_low=k.eps_low,
                            clip_ratio_high=k.eps_high, clip_ratio_c=k.clip_c, kl_estimator=k.kl_estimator,
                            tis_mode=None, tis_cap=1.0, ref_logp=k.ref)
        pg = terms.pg
        clipped, clipped_lower = terms.clipped, terms.clipped_lower
        tis_capped = None
        if k.tis_mode:
            if k.tis_mode == 1:
                log_w = torch.where(mask, old - k.tis, zero).detach()
            else:
                log_w = k.tis
            tis_capped = log_w > k.log_cap
            pg = pg * torch.exp(torch.clamp(log_w, max=k.log_cap))
        pg = torch.where(mask, pg, zero)
        kl = torch.where(mask, terms.kl, zero) if terms.kl is not None else None
        ent_m = torch.where(mask, en, zero)
        c_total = k.coefs[0] * k.part_weights[0] + k.coefs[1] * k.part_weights[1]
        objective = pg
        if k.kl_in_loss:
            objective = objective + k.kl_coef * kl
        if k.ent_in_loss:
            objective = objective - k.ent_coef * ent_m
        inputs = [lp, en] if k.ent_in_loss else [lp]
        grads = torch.autograd.grad((c_total * objective).sum(), inputs, allow_unused=True)
    g_logp = grads[0] if grads[0] is not None else torch.zeros_like(lp)
    g_ent = None
    if k.ent_in_loss:
        g_ent = grads[1] if grads[1] is not None else torch.zeros_like(en)
    cols = []
    f64 = torch.float64
    for p in range(_NUM_PARTS):
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


def _with_deferred_tis(k: _Consts, logp: torch.Tensor) -> _Consts:
    """On-policy sequence TIS: fill in the per-token log-weight from the current log-probs (whole sequences)."""
    if not k.deferred:
        return k
    log_ratio = logp.to(k.dtype) - k.rollout
    return replace(k, tis=_seq_log_weight(log_ratio, k.mask, k.seq_index, k.num_seqs, k.dtype))


# ---------------------------------------------------------------------------------------------------------------
# The two tilings
# ---------------------------------------------------------------------------------------------------------------


def _chunk_bounds(k: _Consts, chunk_rows: int, whole_sequences: bool) -> list[tuple[int, int]]:
    """Row ranges of the token chunks: fixed ``chunk_rows``, or greedy runs of whole sequences (a sequence longer
    than ``chunk_rows`` gets a chunk of its own)."""
    n = k.targets.numel()
    if not whole_sequences:
        return [(r0, min(r0 + chunk_rows, n)) for r0 in range(0, n, chunk_rows)]
    _, counts = torch.unique_consecutive(k.seq_index, return_counts=True)
    bounds: list[tuple[int, int]] = []
    start = end = 0
    for length in counts.tolist():
        if end > start and end + length - start > chunk_rows:
            bounds.append((start, end))
            start = end
        end += length
    if end > start:
        bounds.append((start, end))
    return bounds


def _token_epilogue(z: torch.Tensor, k: _Consts, triton_path: bool, grad: bool, dz_buf: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Epilogue of one token chunk (complete rows). Returns ``(column sums, dZ in the GEMM operand dtype | None)``.

    ``dz_buf``: flat buffer in the weight dtype when it differs from the tile's (half weights, fp32 logits).
    """
    n_rows = z.shape[0]
    acc = k.dtype
    dz = None
    if grad:
        dz = tile_view(dz_buf, n_rows, z.shape[1]) if dz_buf is not None else z
    if triton_path:
        if not k.deferred:
            sums = _launch(k, (True, True, grad), z=z, dz=dz)
            return sums, dz
        st = _RowStats(*(torch.empty(n_rows, dtype=acc, device=z.device) for _ in range(4)))
        _launch(k, (True, False, False), z=z, stats=st)
        k = _with_deferred_tis(k, st.logp)
        if grad:
            sums = _launch(k, (False, True, True), z=z, dz=dz, stats=st)
        else:
            g = (torch.empty(n_rows, dtype=acc, device=z.device), torch.empty(n_rows, dtype=acc, device=z.device))
            sums = _launch(k, (False, True, False), stats=st, g_out=g)
        return sums, dz
    return _token_epilogue_torch(z, k, grad, dz)


def _token_epilogue_torch(z: torch.Tensor, k: _Consts, grad: bool, dz: Optional[torch.Tensor]
                          ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The torch epilogue of one token chunk: the rows are complete and the tile is ours, so it is shifted in place
    and ``exp`` is taken once (``p = e / d`` reuses it). Temporaries: one tile (``e``), plus an fp32 copy for half
    tiles. Same formulas as ``linear_logprob``'s epilogues."""
    s = z if z.dtype == k.dtype else z.to(k.dtype)
    if k.inv_temp != 1.0:
        s.mul_(k.inv_temp)
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
    k = _with_deferred_tis(k, logp)
    g_logp, g_ent, sums = _terms_torch(logp, ent, k)
    if not grad:
        return sums, None
    p = e.div_(d[:, None])
    coef_logp = (g_logp * -k.inv_temp)[:, None]
    if g_ent is not None:
        # s ← −(g_ent/T)·p·(log p + H) − (g_logp/T)·p, with log p = (s − max) − log d
        s.sub_(log_d[:, None]).add_(ent[:, None]).mul_(p).mul_((g_ent * -k.inv_temp)[:, None])
        s.addcmul_(p, coef_logp)
    else:
        torch.mul(p, coef_logp, out=s)
    s[rows, cols] += torch.where(valid, g_logp * k.inv_temp, 0.0)
    out = dz if dz is not None else z
    if s.data_ptr() != out.data_ptr():
        out.copy_(s)
    return sums, out


def _token_path(hidden: torch.Tensor, weight: torch.Tensor, k: _Consts, plan: ChunkPlan, triton_path: bool,
                need_h: bool, need_w: bool, dw_accum: str, rows: Optional[torch.Tensor], n_tokens: int
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Token chunks, 6·T·H·V, over the ``R`` (compacted) rows of ``hidden``: returns ``(column sums,
    dH [n_tokens, H] | None, dW [V, H] | None)``; with compaction (``rows``: the original row of each of the ``R``
    rows) each chunk's ``dH`` goes straight to its rows of the full gradient (no ``[R, H]`` buffer)."""
    n_vocab = weight.shape[0]
    device = hidden.device
    grad = need_h or need_w
    bounds = _chunk_bounds(k, plan.chunk_tokens, whole_sequences=k.deferred)
    max_rows = max((r1 - r0 for r0, r1 in bounds), default=0)
    ldt = hidden.dtype if _HALF_TILES_FOR_STUDY else logits_dtype(hidden.dtype, device)
    zbuf = torch.empty(max_rows * n_vocab, dtype=ldt, device=device)
    obuf = torch.empty(max_rows * n_vocab, dtype=weight.dtype, device=device) if grad and ldt != weight.dtype \
        else None
    d_hidden = None
    if need_h:
        shape = (n_tokens, hidden.shape[1])
        d_hidden = torch.empty(shape, dtype=hidden.dtype, device=device) if rows is None else \
            torch.zeros(shape, dtype=hidden.dtype, device=device)
    d_weight = d_weight_acc = None
    # One chunk, or a sum in the weight dtype: the first chunk's GEMM writes dW (no zero fill, no read of zeros),
    # later chunks add to it in place (beta = 1); an fp32 sum over several chunks needs the fp32 accumulator.
    direct = len(bounds) == 1 or dw_accum == "weight"
    dw_written = False
    if need_w:
        if direct:
            d_weight = torch.empty(weight.shape, dtype=weight.dtype, device=device)
        else:
            d_weight_acc = torch.zeros(weight.shape, dtype=accum_dtype(weight.dtype), device=device)
    sums = torch.zeros(_NUM_COLS, dtype=torch.float64, device=device)
    for r0, r1 in bounds:
        h_c = hidden[r0:r1]
        z = logits_tile(h_c, weight, zbuf)
        chunk_sums, dz = _token_epilogue(z, k.rows(r0, r1), triton_path, grad, obuf)
        sums += chunk_sums
        if not grad:
            continue
        if d_hidden is not None and rows is None:
            torch.mm(dz, weight, out=d_hidden[r0:r1])
        elif d_hidden is not None:
            d_hidden.index_copy_(0, rows[r0:r1], torch.mm(dz, weight))
        if d_weight_acc is not None:
            addmm_acc_(d_weight_acc, dz.t(), h_c, plan.tile_elems)
        elif d_weight is not None and not dw_written:
            torch.mm(dz.t(), h_c, out=d_weight)
            dw_written = True
        elif d_weight is not None:
            d_weight.addmm_(dz.t(), h_c)  # the sum in the weight dtype (dw_accum="weight")
    if d_weight_acc is not None:
        d_weight = d_weight_acc.to(weight.dtype)
    elif d_weight is not None and not dw_written:  # no loss rows: no chunk ran
        d_weight.zero_()
    return sums, d_hidden, d_weight


def _vocab_path(hidden: torch.Tensor, weight: torch.Tensor, k: _Consts, plan: ChunkPlan, triton_path: bool,
                need_h: bool, need_w: bool
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Vocab slabs, 8·T·H·V: statistics pass, per-token terms, recomputing gradient pass (same GEMM calls)."""
    n_rows = hidden.shape[0]
    stats = OnlineRowStats.empty(n_rows, k.dtype, hidden.device, want_entropy=True)

    def stats_epilogue(z: torch.Tensor, rows: slice, cols: slice) -> None:
        update_row_stats_(z, cols.start, k.targets, k.inv_temp, stats, triton_path=triton_path)

    vocab_slab_pass(hidden, weight, plan, stats_epilogue)
    logp, log_norm, ent = stats.finalize(k.targets)
    k = _with_deferred_tis(k, logp)
    if triton_path:
        st = _RowStats(stats.row_max, log_norm, logp.contiguous(), ent.contiguous())
        g_logp, g_ent = torch.empty_like(logp), torch.empty_like(logp)
        sums = _launch(k, (False, True, False), stats=st, g_out=(g_logp, g_ent))
        g_ent = g_ent if k.ent_in_loss else None
    else:
        g_logp, g_ent, sums = _terms_torch(logp, ent, k)
    if not (need_h or need_w):
        return sums, None, None

    def grad_epilogue(z: torch.Tensor, rows: slice, cols: slice) -> None:
        softmax_grad_(z, cols.start, k.targets, k.inv_temp, stats.row_max, log_norm, ent, g_logp, g_ent,
                      triton_path=triton_path)

    d_hidden, d_weight = vocab_slab_pass(hidden, weight, plan, grad_epilogue, grad_hidden=need_h, grad_weight=need_w)
    return sums, d_hidden, d_weight


# ---------------------------------------------------------------------------------------------------------------
# Autograd function
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Setup:
    """What the autograd function needs besides ``hidden`` and ``weight``."""

    consts: _Consts
    rows: Optional[torch.Tensor]  # [R] int64 loss rows when compacted; None: all rows
    plan: ChunkPlan
    tiling: str
    triton_path: bool
    need_h: bool
    need_w: bool
    dw_accum: str


class _FusedLinearPolicyLoss(torch.autograd.Function):
    """Forward computes the loss and the finished ``dH``, ``dW``; backward scales them by the incoming scalar."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, setup: _Setup  # type: ignore[override]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        k = setup.consts
        h = hidden if setup.rows is None else hidden.index_select(0, setup.rows)
        if h.shape[0] == 0:
            sums = torch.zeros(_NUM_COLS, dtype=torch.float64, device=hidden.device)
            d_h = torch.zeros(h.shape, dtype=hidden.dtype, device=hidden.device) if setup.need_h else None
            d_w = torch.zeros_like(weight) if setup.need_w else None
        elif setup.tiling == "token":
            sums, d_h, d_w = _token_path(h, weight, k, setup.plan, setup.triton_path, setup.need_h, setup.need_w,
                                         setup.dw_accum, setup.rows, hidden.shape[0])
        else:
            sums, d_h, d_w = _vocab_path(h, weight, k, setup.plan, setup.triton_path, setup.need_h, setup.need_w)
        if d_h is not None and setup.rows is not None and d_h.shape[0] != hidden.shape[0]:
            full = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            d_h = full.index_copy_(0, setup.rows, d_h)
        loss = None
        for weight_p, part in zip(k.part_weights, part_losses(sums, _NUM_PARTS, k)):
            loss = part * weight_p if loss is None else loss + part * weight_p
        ctx.grads = (d_h, d_w)
        ctx.mark_non_differentiable(sums)
        return loss.to(k.dtype), sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor, grad_sums: Optional[torch.Tensor]  # type: ignore[override]
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
        if ctx.grads is None:
            raise RuntimeError("fused_linear_policy_loss stores its gradient once: backward through it twice "
                               "(retain_graph=True) is not supported")
        d_h, d_w = ctx.grads
        ctx.grads = None  # scaled in place below and handed over: no second copy of dW
        d_h = d_h if ctx.needs_input_grad[0] else None
        d_w = d_w if ctx.needs_input_grad[1] else None
        # One multi-tensor multiply by the 0-dim fp32 upstream gradient, read on the device (no host sync). The
        # product is formed in fp32 and rounded once: casting g to bf16 first would scale a loss divided by 3
        # (gradient accumulation) by 0.33398. The foreach kernel also loads vectors, unlike ``mul_`` by a 0-dim
        # CUDA tensor (a broadcast operand): 1.9 ms for dH + dW at V = 151936, H = 4096 on an H100 (measured
        # before this change; its gain is not measured yet).
        present = [t for t in (d_h, d_w) if t is not None]
        if present:
            torch._foreach_mul_(present, grad_loss.detach())
        return d_h, d_w, None


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"shape {tuple(t.shape)} dtype {t.dtype}"
    return f"a {type(t).__name__}"


def _validate(hidden: torch.Tensor, weight: torch.Tensor, batch: PackedBatch) -> None:
    """Shapes, dtypes, devices and target range; ``ValueError`` naming the argument and its shape."""
    if not isinstance(batch, PackedBatch):
        raise ValueError(f"batch must be a PackedBatch; got {type(batch).__name__}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a 2-D floating tensor [T, H]; got {_describe(hidden)}")
    if hidden.shape[0] != batch.num_tokens:
        raise ValueError(f"hidden must be [T, H] with T = batch.num_tokens = {batch.num_tokens}; got shape "
                         f"{tuple(hidden.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating tensor [V, H]; got {_describe(weight)}")
    if weight.shape[1] != hidden.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, H] with V >= 1 and H = hidden.shape[1] = {hidden.shape[1]}; got "
                         f"shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} (shape {tuple(weight.shape)}) must equal hidden dtype "
                         f"{hidden.dtype} (shape {tuple(hidden.shape)})")
    if weight.device != hidden.device or batch.targets.device != hidden.device:
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and the batch must share a "
                         f"device; got {hidden.device}, {weight.device}, {batch.targets.device}")
    n_vocab = weight.shape[0]
    targets, mask = batch.targets, batch.loss_mask
    if targets.shape != (batch.num_tokens,) or mask.shape != (batch.num_tokens,):
        raise ValueError(f"batch.targets and batch.loss_mask must be [T] = ({batch.num_tokens},); got "
                         f"{tuple(targets.shape)} and {tuple(mask.shape)}")
    ignored = targets == IGNORE_INDEX
    bad_range = ~ignored & ((targets < 0) | (targets >= n_vocab))
    bad_mask = mask.bool() & ignored
    flags = torch.stack([bad_range.any(), bad_mask.any()]).tolist() if targets.numel() else [False, False]
    if flags[0]:
        raise ValueError(f"batch.targets (shape {tuple(targets.shape)}) must lie in [0, V = {n_vocab}) or equal "
                         f"{IGNORE_INDEX}; found {int(targets[bad_range][0])}")
    if flags[1]:
        raise ValueError(f"batch.loss_mask covers a position whose target is {IGNORE_INDEX} (token "
                         f"{int(torch.nonzero(bad_mask)[0])}); such a token has no log-prob")


def _token_tensor(value: Optional[torch.Tensor], name: str, n: int, dtype: torch.dtype, device: torch.device
                  ) -> Optional[torch.Tensor]:
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.shape != (n,) or not value.is_floating_point():
        raise ValueError(f"batch.{name} must be a floating tensor [T] = ({n},); got {_describe(value)}")
    return value.detach().to(device=device, dtype=dtype)


def _prepare_consts(batch: PackedBatch, config: "PolicyLossConfig", lambda_corr: float,
                    advantages: Optional[torch.Tensor], estimator: str, base_normalizer: Optional[float],
                    corr_normalizer: Optional[float], dtype: torch.dtype, device: torch.device) -> _Consts:
    """Per-token constants ``[T]`` (all rows; compaction happens afterwards)."""
    n = batch.num_tokens
    num_seqs = batch.num_seqs
    mask = batch.loss_mask.to(device).bool()
    seq_index = batch.seq_index().to(device)
    zero = torch.zeros((), dtype=dtype, device=device)

    def clean(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else torch.where(mask, t, zero).contiguous()

    if advantages is None:
        reward = batch.reward.double() if dtype == torch.float64 else batch.reward
        advantages = group_advantages(reward, batch.group_id, estimator=estimator)
    if not isinstance(advantages, torch.Tensor) or not advantages.is_floating_point():
        raise ValueError(f"advantages must be a floating tensor [S] or [T]; got {_describe(advantages)}")
    adv = advantages.detach().to(device=device, dtype=dtype)
    if adv.shape == (n,):
        pass
    elif adv.shape == (num_seqs,):
        adv = adv[seq_index]
    else:
        raise ValueError(f"advantages must be per-token [T] = ({n},) or per-sequence [S] = ({num_seqs},); got shape "
                         f"{tuple(advantages.shape)}")
    old = clean(_token_tensor(batch.old_logp, "old_logp", n, dtype, device))
    ref = clean(_token_tensor(batch.ref_logp, "ref_logp", n, dtype, device))
    rollout = clean(_token_tensor(batch.rollout_logp, "rollout_logp", n, dtype, device))

    tis_mode = _TIS_CODE[config.tis_mode]
    tis = None
    if tis_mode == 1:
        tis = rollout
    elif tis_mode == 2 and old is not None:
        tis = _seq_log_weight(old - rollout, mask, seq_index, num_seqs, dtype)

    lens = batch.seq_lens
    default_scale = float(lens.max()) if num_seqs else 1.0
    scale = config.loss_scale_factor if config.loss_scale_factor is not None else default_scale
    token_stream = batch.stream.to(device)[seq_index]
    part_masks = (mask & (token_stream == BASE_STREAM), mask & (token_stream == CORRECTION_STREAM))
    coefs = torch.stack([
        token_coefficients(pm, seq_index, num_seqs, config.loss_agg_mode, scale_factor=scale, normalizer=norm,
                           dtype=dtype)
        for pm, norm in zip(part_masks, (base_normalizer, corr_normalizer))
    ]).contiguous()
    part_weights = [1.0, float(lambda_corr)]
    kl_mode = _KL_CODE[config.kl_estimator] if ref is not None else 0
    return _Consts(
        targets=batch.targets.to(device).long().contiguous(), mask=mask, mask_u8=mask.contiguous().view(torch.uint8),
        seq_index=seq_index, num_seqs=num_seqs, old=old, adv=clean(adv), ref=ref, rollout=rollout, tis=tis,
        coefs=coefs, part_weights=part_weights,
        weights_t=torch.tensor(part_weights, dtype=torch.float32, device=device),
        inv_temp=1.0 / float(config.temperature), eps_low=float(config.clip_ratio_low),
        eps_high=float(config.clip_ratio_high), clip_low=1.0 - config.clip_ratio_low,
        clip_high=1.0 + config.clip_ratio_high, clip_c=config.clip_ratio_c, log_cap=math.log(config.tis_cap),
        kl_coef=float(config.kl_coef), ent_coef=float(config.entropy_coef), kl_mode=kl_mode,
        kl_estimator=config.kl_estimator if kl_mode else None, kl_in_loss=bool(kl_mode) and config.kl_coef > 0,
        tis_mode=tis_mode, ent_in_loss=config.entropy_coef > 0, dtype=dtype,
    )


#: Compact to the loss rows when they are at most this share of the tokens: below it the saved FLOPs pay for the
#: gathered ``[R, H]`` copy of ``hidden``; above it the few non-loss rows are computed and masked.
COMPACT_BELOW = 0.9


def _compact(k: _Consts) -> tuple[_Consts, Optional[torch.Tensor]]:
    """Keep only the loss rows (nothing else reaches the loss or a metric) when they are at most
    :data:`COMPACT_BELOW` of the tokens. Returns the constants and the row indices, or ``(k, None)``."""
    n = k.targets.numel()
    rows = torch.nonzero(k.mask).squeeze(1)
    if rows.numel() > COMPACT_BELOW * n:
        return k, None

    def pick(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.index_select(0, rows).contiguous()

    mask = k.mask.index_select(0, rows)
    return replace(k, targets=pick(k.targets), mask=mask, mask_u8=mask.view(torch.uint8), seq_index=pick(k.seq_index),
                   old=pick(k.old), adv=pick(k.adv), ref=pick(k.ref), rollout=pick(k.rollout), tis=pick(k.tis),
                   coefs=k.coefs.index_select(1, rows).contiguous()), rows


def _tile_bytes(chunk_rows: int, n_vocab: int, weight_dtype: torch.dtype) -> int:
    """Bytes of one token chunk's tile: fp32 logits (an upper bound: half on CPU) plus, for half weights, the
    half copy of ``dL/dz`` that feeds the gradient GEMMs."""
    half = weight_dtype in (torch.float16, torch.bfloat16)
    return chunk_rows * n_vocab * (4 + (2 if half else 0))


def _choose_tiling(n_rows: int, n_vocab: int, n_hidden: int, plan: ChunkPlan, k: _Consts, dw_accum: str = "fp32",
                   weight_dtype: torch.dtype = torch.float32) -> str:
    """Token chunks (6·THV) when their extra memory fits :data:`MEMORY_BUDGET_BYTES` — the tile (:func:`_tile_bytes`),
    the fp32 ``dW`` accumulator (none for one chunk or ``dw_accum="weight"``) and, for half weights summed in fp32,
    ``addmm_acc_``'s fp32 products (one tile budget) — and, for on-policy sequence TIS, no sequence is longer than a
    chunk; else the tiling with the smaller accumulator."""
    accumulated = n_rows > plan.chunk_tokens and dw_accum == "fp32"
    acc_bytes = n_vocab * n_hidden * 4 if accumulated else 0
    temp_bytes = plan.tile_elems * 4 if accumulated and weight_dtype in (torch.float16, torch.bfloat16) else 0
    fits = acc_bytes + _tile_bytes(plan.chunk_tokens, n_vocab, weight_dtype) + temp_bytes <= MEMORY_BUDGET_BYTES
    if fits and k.deferred and n_rows:
        _, counts = torch.unique_consecutive(k.seq_index, return_counts=True)
        fits = int(counts.max()) <= plan.chunk_tokens
    return "token" if fits else smaller_accumulator_axis(n_rows, n_vocab)


def resolve_dw_accum(dw_accum: str, device: torch.device, weight_dtype: torch.dtype) -> str:
    """``"auto"`` → ``"weight"`` for fp16/bf16 weights on CUDA, else ``"fp32"``; other values unchanged.

    Why (H100, bf16, V = 151936; bench/results/h100-2026-11-26): summing ``dW`` in fp32 costs a ``V × H`` fp32
    buffer (2.3 GiB at H = 4096, over the 1.5 GiB budget, so the automatic tiling falls back to 8·THV vocab slabs:
    1.76× the bare LM-head matmul at T = 8192, H = 4096) while the weight-dtype sum takes token chunks at 1.28×
    (1.20× at T = 32768). Its extra rounding moves the relative dW error vs float64 from 2.2e-3 to 3.0-3.2e-3
    (chunks of 2048-1024 rows, T = 8192); torch's own bf16 path (bf16 logits, fp32 softmax) has 6.2e-3 and Liger's
    fused cross-entropy 6.4e-3 (T = 2048). The returned ``dW`` is in the weight dtype either way."""
    if dw_accum != "auto":
        return dw_accum
    return "weight" if device.type == "cuda" and weight_dtype in (torch.float16, torch.bfloat16) else "fp32"


#: Most rows per token chunk that :func:`_weight_accum_chunk_rows` picks (the largest size measured).
_MAX_WEIGHT_ACCUM_CHUNK = 2048


def _weight_accum_chunk_rows(n_vocab: int, weight_dtype: torch.dtype) -> int:
    """Rows per token chunk on CUDA when ``dW`` is summed in the weight dtype: the largest multiple of 128 (at most
    2048) whose tile fits 90 % of :data:`MEMORY_BUDGET_BYTES` — 1536 at V = 151936 with bf16 weights.

    Each chunk re-reads and re-writes the whole ``V × H`` gradient (``addmm_`` with beta = 1), so few large chunks
    win: on an H100 at T = 8192, H = 4096, V = 151936 (bench/results/h100-2026-11-26, tiling study) chunks of 384
    rows took 64.1 ms of device time, chunks of 1024 and 2048 rows 49.4 and 47.9 ms."""
    rows = int(0.9 * MEMORY_BUDGET_BYTES) // _tile_bytes(1, max(n_vocab, 1), weight_dtype)
    return max(128, min(_MAX_WEIGHT_ACCUM_CHUNK, rows // 128 * 128))


def _check_interpreted() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(_fused_epilogue_kernel, InterpretedFunction):
        raise RuntimeError("cipo.kernels.fused_linear_policy_loss was imported before TRITON_INTERPRET=1 was set, "
                           "so its Triton kernels cannot run on CPU tensors; set TRITON_INTERPRET=1 before importing")


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    batch: PackedBatch,
    config: "PolicyLossConfig",
    *,
    lambda_corr: float = 1.0,
    advantages: Optional[torch.Tensor] = None,
    chunk_tokens: Optional[int] = None,
    base_normalizer: Optional[float] = None,
    corr_normalizer: Optional[float] = None,
    estimator: str = "grpo",
    tiling: Optional[str] = None,
    dw_accum: str = "auto",
) -> tuple[torch.Tensor, dict[str, float]]:
    """CIPO's joint policy loss straight from the final hidden states and the LM-head weight.

    Equal to ``cipo_policy_loss(logp, batch, config, entropy=entropy, ...)`` with ``logp``/``entropy`` those of
    ``log_softmax(hidden @ weight.T / config.temperature)`` at ``batch.targets``, gradients included, without the
    ``[T, V]`` logits; the gradient w.r.t. ``hidden`` and ``weight`` is finished in the forward (module docstring).

    Args:
        hidden: ``[T, H]`` final hidden states of the packed batch (fp32/bf16/fp16; fp64 for reference checks).
        weight: ``[V, H]`` LM-head weight, same dtype and device.
        batch: the packed step. ``old_logp`` None means on-policy (``old_logp := logp`` detached, ratio 1);
            ``ref_logp`` is used when given (``kl`` metric; in the loss when ``config.kl_coef > 0``), and
            ``rollout_logp`` when ``config.tis_mode`` is set.
        config: the loss knobs; ``config.temperature`` divides the logits.
        lambda_corr: λ, the weight of the correction stream, ≥ 0.
        advantages: ``[S]`` or ``[T]``; by default the group advantages of ``batch.reward`` within
            ``batch.group_id`` with ``estimator``.
        chunk_tokens: logits tile of ``chunk_tokens × V`` elements (rows per token chunk; ``chunk_tokens·V/T``
            columns per vocab slab); None: 256 MiB of fp32 logits on CUDA, 64 MiB on CPU.
        base_normalizer, corr_normalizer: each stream's global token/sequence count for micro-batches.
        estimator: ``grpo``, ``drgrpo`` or ``rloo`` (only without ``advantages``).
        tiling: ``"token"`` (6·THV; an fp32 ``V × H`` accumulator unless ``dW`` is summed in the weight dtype),
            ``"vocab"`` (8·THV, fp32 ``T × H`` accumulator) or None (automatic, see :func:`_choose_tiling`).
        dw_accum: the dtype of the token tiling's cross-chunk ``dW`` sum: ``"fp32"``, ``"weight"`` (no extra
            ``V × H`` buffer; the running sum is rounded to the weight dtype once per chunk, as Liger's fused
            cross-entropy does) or ``"auto"`` (default): ``"weight"`` for half weights on CUDA, else ``"fp32"``
            (:func:`resolve_dw_accum`).

    Returns:
        ``(loss, metrics)``: a 0-dim fp32 tensor (fp64 for fp64 inputs) whose backward populates the gradients of
        ``hidden`` and ``weight``, and the floats of ``cipo_policy_loss``: ``loss/base``, ``loss/corr``,
        ``pg_loss``, ``clipfrac``, ``clipfrac_lower``, ``approx_kl``, ``kl`` (with ``ref_logp``), ``entropy``
        (always), ``tis_clipfrac`` (with TIS), ``tokens/base``, ``tokens/corr``.

    Raises:
        ValueError: wrong shapes/dtypes/devices (naming the argument and shape), targets outside ``[0, V)`` other
            than -100, a loss token without a target, missing ``ref_logp``/``rollout_logp`` the config needs.

    Not supported: double backward; backward twice through one call (the stored gradient is handed over).
    """
    from ..config import PolicyLossConfig

    if not isinstance(config, PolicyLossConfig):
        raise ValueError(f"config must be a PolicyLossConfig; got {type(config).__name__}")
    if not (isinstance(lambda_corr, (int, float)) and not isinstance(lambda_corr, bool) and lambda_corr >= 0):
        raise ValueError(f"lambda_corr must be a float >= 0; got {lambda_corr!r}")
    if tiling not in (None, "token", "vocab"):
        raise ValueError(f"tiling must be 'token', 'vocab' or None; got {tiling!r}")
    if dw_accum not in ("auto", "fp32", "weight"):
        raise ValueError(f"dw_accum must be 'auto', 'fp32' or 'weight'; got {dw_accum!r}")
    _validate(hidden, weight, batch)
    if config.kl_coef > 0 and batch.ref_logp is None:
        raise ValueError("config.kl_coef > 0 needs ref_logp (the reference policy's log-probs)")
    if config.tis_mode is not None and batch.rollout_logp is None:
        raise ValueError(f"config.tis_mode={config.tis_mode!r} needs rollout_logp (the rollout engine's "
                         "log-probs)")
    device = hidden.device
    dtype = accum_dtype(hidden.dtype)
    dw_accum = resolve_dw_accum(dw_accum, device, weight.dtype)
    k = _prepare_consts(batch, config, lambda_corr, advantages, estimator, base_normalizer, corr_normalizer, dtype,
                        device)
    token_counts = torch.stack([(k.mask & (batch.stream.to(device)[k.seq_index] == s)).sum()
                                for s in (BASE_STREAM, CORRECTION_STREAM)])
    k, rows = _compact(k)
    n_rows, n_vocab, n_hidden = k.targets.numel(), weight.shape[0], weight.shape[1]
    plan = plan_chunks(n_rows, n_vocab, device, chunk_tokens)
    if chunk_tokens is None and dw_accum == "weight" and tiling != "vocab" and device.type == "cuda":
        rows_per_chunk = _weight_accum_chunk_rows(n_vocab, weight.dtype)
        if rows_per_chunk > plan.chunk_tokens:
            plan = plan_chunks(n_rows, n_vocab, device, rows_per_chunk)
    chosen = tiling if tiling is not None else _choose_tiling(n_rows, n_vocab, n_hidden, plan, k, dw_accum,
                                                              weight.dtype)
    triton_path = HAS_TRITON and dtype != torch.float64 and use_triton(hidden, weight)
    if triton_path and not hidden.is_cuda:
        _check_interpreted()
    grad_on = torch.is_grad_enabled()
    setup = _Setup(consts=k, rows=rows, plan=plan, tiling=chosen, triton_path=triton_path,
                   need_h=grad_on and hidden.requires_grad, need_w=grad_on and weight.requires_grad, dw_accum=dw_accum)
    loss, sums = _FusedLinearPolicyLoss.apply(hidden, weight, setup)
    return loss, _metrics(sums, k, token_counts)


def _metrics(sums: torch.Tensor, k: _Consts, token_counts: torch.Tensor) -> dict[str, float]:
    """The metric dict of ``cipo_policy_loss`` (same keys, same order) from the float64 column sums."""
    from ..loss import metrics_to_floats  # lazy: cipo.loss is imported by cipo, this module lazily by cipo

    named: dict[str, torch.Tensor] = {}
    for name, value in zip(("base", "corr"), part_losses(sums, _NUM_PARTS, k)):
        named[f"loss/{name}"] = value

    def weighted(col: int) -> torch.Tensor:
        return sums[col] * k.part_weights[0] + sums[3 + col] * k.part_weights[1]

    met = sums[3 * _NUM_PARTS:]
    count = met[_COL_COUNT].clamp(min=1.0)  # masked_mean of an empty mask is 0: its total is 0
    named["pg_loss"] = weighted(0)
    named["clipfrac"] = met[_COL_CLIPPED] / count
    named["clipfrac_lower"] = met[_COL_CLIPPED_LOWER] / count
    named["approx_kl"] = met[_COL_NEG_LOG_RATIO] / count
    if k.kl_mode:
        named["kl"] = weighted(1)
    named["entropy"] = weighted(2)
    if k.tis_mode:
        named["tis_clipfrac"] = met[_COL_TIS_CAPPED] / count
    named["tokens/base"] = token_counts[0]
    named["tokens/corr"] = token_counts[1]
    return metrics_to_floats(named)
