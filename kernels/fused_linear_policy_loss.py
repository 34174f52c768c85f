"""Fused LM head + CIPO policy loss: hidden states and the head weight in, loss and finished gradients out.

``cipo.fused_linear_policy_loss(hidden [T, H], weight [V, H], batch, config, ...)`` — here its tensor-level core
:func:`fused_linear_policy_loss_flat` — equals
``cipo.cipo_policy_loss(logp, batch, config, entropy=entropy, ...)`` with ``logp, entropy`` the per-token
log-prob and entropy of ``softmax(hidden @ weight.T / temperature)`` — gradients w.r.t. ``hidden`` and ``weight``
included — without ever holding the ``[T, V]`` logits.

Why the gradient can be finished in the forward
-----------------------------------------------
Every aggregation mode is linear in the per-token values (``agg_p(v) = Σ_t c_p[t]·v_t``, coefficients from
:func:`.policy_loss_torch.token_coefficients`), and a token's loss ``ℓ_t = pg_t·w_t + β·kl_t − γ·H_t`` depends only
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
budget at any shape (chunks of up to 2048 rows, :func:`weight_accum_chunk_rows`); fp32 sums keep the rule above.

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
  ``cipo.cipo_policy_loss`` does when given the entropy; it enters the loss and the gradient only when
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

Files: this module holds the tiling choice, the two tilings' drivers, the autograd function and the tensor-level
entry :func:`fused_linear_policy_loss_flat`; the Triton epilogue and its launcher are :mod:`._fused_epilogue`, the
torch epilogue (the CPU path; fp64 always takes it) :mod:`.fused_linear_policy_loss_torch`, the chunk loop
``_chunking.token_chunk_pass``. The packed-batch entry ``cipo.fused_linear_policy_loss`` (``cipo/fused_loss.py``)
validates the batch and prepares the tensors and the :class:`._loss_plan.LossPlan`. Measured costs of the tilings
and of the ``dW`` sums: docs/BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._chunking import (
    ChunkPlan,
    accum_dtype,
    chunk_bounds,
    plan_chunks,
    smaller_accumulator_axis,
    tile_view,
    token_chunk_pass,
    vocab_slab_pass,
)
from ._dispatch import use_triton
from ._fused_epilogue import HAS_TRITON, RowStats, TokenRows, launch
from ._loss_plan import LossPlan, part_coefficients, seq_log_weight
from .fused_linear_policy_loss_torch import terms_torch, token_epilogue_torch
from .linear_logprob import OnlineRowStats, softmax_grad_, update_row_stats_

__all__ = ["COMPACT_BELOW", "MEMORY_BUDGET_BYTES", "choose_tiling", "compact_rows", "fused_linear_policy_loss_flat",
           "resolve_dw_accum", "tile_bytes", "token_rows", "weight_accum_chunk_rows"]

#: Extra-memory budget the automatic tiling choice respects (the GPU memory target, docs/BENCHMARKS.md).
MEMORY_BUDGET_BYTES = int(1.5 * 2**30)

#: Compact to the loss rows when they are at most this share of the tokens: below it the saved FLOPs pay for the
#: gathered ``[R, H]`` copy of ``hidden``; above it the few non-loss rows are computed and masked.
COMPACT_BELOW = 0.9

#: Most rows per token chunk that :func:`weight_accum_chunk_rows` picks (the largest size measured).
_MAX_WEIGHT_ACCUM_CHUNK = 2048


# ---------------------------------------------------------------------------------------------------------------
# Tiling policy
# ---------------------------------------------------------------------------------------------------------------


def compact_rows(k: TokenRows) -> tuple[TokenRows, Optional[torch.Tensor]]:
    """Keep only the loss rows (nothing else reaches the loss or a metric) when they are at most
    :data:`COMPACT_BELOW` of the tokens. Returns the rows and their indices, or ``(k, None)``."""
    n = k.targets.numel()
    rows = torch.nonzero(k.mask).squeeze(1)
    if rows.numel() > COMPACT_BELOW * n:
        return k, None
    return k.select(rows), rows


def tile_bytes(chunk_rows: int, n_vocab: int, weight_dtype: torch.dtype) -> int:
    """Bytes of one token chunk's tile: fp32 logits (an upper bound: half on CPU) plus, for half weights, the
    half copy of ``dL/dz`` that feeds the gradient GEMMs."""
    half = weight_dtype in (torch.float16, torch.bfloat16)
    return chunk_rows * n_vocab * (4 + (2 if half else 0))


def choose_tiling(n_rows: int, n_vocab: int, n_hidden: int, plan: ChunkPlan, k: TokenRows, dw_accum: str = "fp32",
                  weight_dtype: torch.dtype = torch.float32) -> str:
    """Token chunks (6·THV) when their extra memory fits :data:`MEMORY_BUDGET_BYTES` — the tile (:func:`tile_bytes`),
    the fp32 ``dW`` accumulator (none for one chunk or ``dw_accum="weight"``) and, for half weights summed in fp32,
    ``addmm_acc_``'s fp32 products (one tile budget) — and, for on-policy sequence TIS, no sequence is longer than a
    chunk; else the tiling with the smaller accumulator."""
    accumulated = n_rows > plan.chunk_tokens and dw_accum == "fp32"
    acc_bytes = n_vocab * n_hidden * 4 if accumulated else 0
    temp_bytes = plan.tile_elems * 4 if accumulated and weight_dtype in (torch.float16, torch.bfloat16) else 0
    fits = acc_bytes + tile_bytes(plan.chunk_tokens, n_vocab, weight_dtype) + temp_bytes <= MEMORY_BUDGET_BYTES
    if fits and k.deferred and n_rows:
        _, counts = torch.unique_consecutive(k.seq_index, return_counts=True)
        fits = int(counts.max()) <= plan.chunk_tokens
    return "token" if fits else smaller_accumulator_axis(n_rows, n_vocab)


def resolve_dw_accum(dw_accum: str, device: torch.device, weight_dtype: torch.dtype) -> str:
    """``"auto"`` → ``"weight"`` for fp16/bf16 weights on CUDA, else ``"fp32"``; other values unchanged.

    Why: summing ``dW`` in fp32 over several chunks costs a ``V × H`` fp32 buffer (2.3 GiB at V = 151936,
    H = 4096: over the budget, so the automatic tiling would fall back to 8·THV vocab slabs), while the
    weight-dtype sum keeps the 6·THV token chunks; its extra rounding stays below that of torch's own bf16 path
    (measurements: docs/BENCHMARKS.md, "dW accumulation"). The returned ``dW`` is in the weight dtype either way."""
    if dw_accum != "auto":
        return dw_accum
    return "weight" if device.type == "cuda" and weight_dtype in (torch.float16, torch.bfloat16) else "fp32"


def weight_accum_chunk_rows(n_vocab: int, weight_dtype: torch.dtype) -> int:
    """Rows per token chunk on CUDA when ``dW`` is summed in the weight dtype: the largest multiple of 128 (at most
    2048) whose tile fits 90 % of :data:`MEMORY_BUDGET_BYTES` — 1536 at V = 151936 with bf16 weights.

    Each chunk re-reads and re-writes the whole ``V × H`` gradient (``addmm_`` with beta = 1), so few large chunks
    win (measured chunk sizes: docs/BENCHMARKS.md, "dW accumulation")."""
    rows = int(0.9 * MEMORY_BUDGET_BYTES) // tile_bytes(1, max(n_vocab, 1), weight_dtype)
    return max(128, min(_MAX_WEIGHT_ACCUM_CHUNK, rows // 128 * 128))


# ---------------------------------------------------------------------------------------------------------------
# The two tilings
# ---------------------------------------------------------------------------------------------------------------


def _token_epilogue(z: torch.Tensor, k: TokenRows, plan: LossPlan, triton_path: bool, grad: bool,
                    dz_buf: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Epilogue of one token chunk (complete rows). Returns ``(column sums, dZ in the GEMM operand dtype | None)``.

    ``dz_buf``: flat buffer in the weight dtype when it differs from the tile's (half weights, fp32 logits).
    """
    n_rows = z.shape[0]
    acc = k.dtype
    dz = None
    if grad:
        dz = tile_view(dz_buf, n_rows, z.shape[1]) if dz_buf is not None else z
    if not triton_path:
        return token_epilogue_torch(z, k, plan, grad, dz)
    if not k.deferred:
        return launch(k, plan, (True, True, grad), z=z, dz=dz), dz
    st = RowStats(*(torch.empty(n_rows, dtype=acc, device=z.device) for _ in range(4)))
    launch(k, plan, (True, False, False), z=z, stats=st)
    k = k.with_deferred_tis(st.logp)
    if grad:
        return launch(k, plan, (False, True, True), z=z, dz=dz, stats=st), dz
    g = (torch.empty(n_rows, dtype=acc, device=z.device), torch.empty(n_rows, dtype=acc, device=z.device))
    return launch(k, plan, (False, True, False), stats=st, g_out=g), dz


def _token_path(hidden: torch.Tensor, weight: torch.Tensor, k: TokenRows, plan: LossPlan, chunks: ChunkPlan,
                triton_path: bool, need_h: bool, need_w: bool, dw_accum: str, rows: Optional[torch.Tensor],
                n_tokens: int) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Token chunks, 6·T·H·V, over the ``R`` (compacted) rows of ``hidden``: returns ``(column sums,
    dH [n_tokens, H] | None, dW [V, H] | None)``; with compaction (``rows``: the original row of each of the ``R``
    rows) each chunk's ``dH`` goes straight to its rows of the full gradient (no ``[R, H]`` buffer)."""
    grad = need_h or need_w
    bounds = chunk_bounds(k.targets.numel(), chunks.chunk_tokens, k.seq_index if k.deferred else None)
    max_rows = max((r1 - r0 for r0, r1 in bounds), default=0)
    sums = [torch.zeros(plan.num_cols, dtype=torch.float64, device=hidden.device)]
    obuf: list[torch.Tensor] = []  # the half GEMM operand the epilogue writes dL/dz into (fp32 tiles, half weights)

    def epilogue(z: torch.Tensor, rs: slice, cols: slice) -> Optional[torch.Tensor]:
        if grad and z.dtype != weight.dtype and not obuf:
            obuf.append(torch.empty(max_rows * weight.shape[0], dtype=weight.dtype, device=z.device))
        chunk_sums, dz = _token_epilogue(z, k.rows(rs.start, rs.stop), plan, triton_path, grad,
                                         obuf[0] if obuf else None)
        sums[0] += chunk_sums
        return dz

    d_hidden, d_weight = token_chunk_pass(hidden, weight, chunks, epilogue, grad_hidden=need_h, grad_weight=need_w,
                                          bounds=bounds, dw_accum=dw_accum, out_rows=rows, n_out_rows=n_tokens)
    return sums[0], d_hidden, d_weight


def _vocab_path(hidden: torch.Tensor, weight: torch.Tensor, k: TokenRows, plan: LossPlan, chunks: ChunkPlan,
                triton_path: bool, need_h: bool, need_w: bool
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Vocab slabs, 8·T·H·V: statistics pass, per-token terms, recomputing gradient pass (same GEMM calls)."""
    n_rows = hidden.shape[0]
    stats = OnlineRowStats.empty(n_rows, k.dtype, hidden.device, want_entropy=True)
    inv_temp = plan.inv_temp

    def stats_epilogue(z: torch.Tensor, rows: slice, cols: slice) -> None:
        update_row_stats_(z, cols.start, k.targets, inv_temp, stats, triton_path=triton_path)

    vocab_slab_pass(hidden, weight, chunks, stats_epilogue)
    logp, log_norm, ent = stats.finalize(k.targets)
    k = k.with_deferred_tis(logp)
    if triton_path:
        st = RowStats(stats.row_max, log_norm, logp.contiguous(), ent.contiguous())
        g_logp, g_ent = torch.empty_like(logp), torch.empty_like(logp)
        sums = launch(k, plan, (False, True, False), stats=st, g_out=(g_logp, g_ent))
        g_ent = g_ent if plan.ent_in_loss else None
    else:
        g_logp, g_ent, sums = terms_torch(logp, ent, k, plan)
    if not (need_h or need_w):
        return sums, None, None

    def grad_epilogue(z: torch.Tensor, rows: slice, cols: slice) -> None:
        softmax_grad_(z, cols.start, k.targets, inv_temp, stats.row_max, log_norm, ent, g_logp, g_ent,
                      triton_path=triton_path)

    d_hidden, d_weight = vocab_slab_pass(hidden, weight, chunks, grad_epilogue, grad_hidden=need_h,
                                         grad_weight=need_w)
    return sums, d_hidden, d_weight


# ---------------------------------------------------------------------------------------------------------------
# Autograd function
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Setup:
    """What the autograd function needs besides ``hidden`` and ``weight``."""

    tokens: TokenRows
    plan: LossPlan
    rows: Optional[torch.Tensor]  # [R] int64 loss rows when compacted; None: all rows
    chunks: ChunkPlan
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
        k, plan = setup.tokens, setup.plan
        h = hidden if setup.rows is None else hidden.index_select(0, setup.rows)
        if h.shape[0] == 0:
            sums = torch.zeros(plan.num_cols, dtype=torch.float64, device=hidden.device)
            d_h = torch.zeros(h.shape, dtype=hidden.dtype, device=hidden.device) if setup.need_h else None
            d_w = torch.zeros_like(weight) if setup.need_w else None
        elif setup.tiling == "token":
            sums, d_h, d_w = _token_path(h, weight, k, plan, setup.chunks, setup.triton_path, setup.need_h,
                                         setup.need_w, setup.dw_accum, setup.rows, hidden.shape[0])
        else:
            sums, d_h, d_w = _vocab_path(h, weight, k, plan, setup.chunks, setup.triton_path, setup.need_h,
                                         setup.need_w)
        if d_h is not None and setup.rows is not None and d_h.shape[0] != hidden.shape[0]:
            full = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            d_h = full.index_copy_(0, setup.rows, d_h)
        ctx.grads = (d_h, d_w)
        ctx.mark_non_differentiable(sums)
        return plan.loss_from_sums(sums).to(k.dtype), sums

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
        # CUDA tensor (a broadcast operand).
        present = [t for t in (d_h, d_w) if t is not None]
        if present:
            torch._foreach_mul_(present, grad_loss.detach())
        return d_h, d_w, None

# ---------------------------------------------------------------------------------------------------------------
# Tensor-level entry
# ---------------------------------------------------------------------------------------------------------------


def _check_interpreted() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    from ._fused_epilogue import _fused_epilogue_kernel

    if not isinstance(_fused_epilogue_kernel, InterpretedFunction):
        raise RuntimeError("cipo.kernels.fused_linear_policy_loss was imported before TRITON_INTERPRET=1 was set, "
                           "so its Triton kernels cannot run on CPU tensors; set TRITON_INTERPRET=1 before importing")


def token_rows(targets: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor, num_seqs: int,
               part_masks: list[torch.Tensor], advantages: torch.Tensor, plan: LossPlan, *,
               old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor],
               rollout_logp: Optional[torch.Tensor], dtype: torch.dtype) -> TokenRows:
    """All rows' inputs of :func:`fused_linear_policy_loss_flat` (same arguments; compaction comes after): the TIS
    input and the aggregation coefficients added."""
    tis = None
    if plan.tis_code == 1:
        tis = rollout_logp
    elif plan.tis_code == 2 and old_logp is not None:
        tis = seq_log_weight(old_logp, rollout_logp, mask, seq_index, num_seqs, dtype)
    return TokenRows(
        targets=targets.long().contiguous(), mask=mask, mask_u8=mask.contiguous().view(torch.uint8),
        seq_index=seq_index, num_seqs=num_seqs, old=old_logp, adv=advantages, ref=ref_logp if plan.kl_mode else None,
        rollout=rollout_logp, tis=tis, coefs=part_coefficients(plan, part_masks, seq_index, num_seqs, dtype),
        weights=torch.tensor(plan.part_weights, dtype=torch.float32, device=mask.device), seq_tis=plan.tis_code == 2,
        dtype=dtype,
    )


def fused_linear_policy_loss_flat(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    seq_index: torch.Tensor,
    num_seqs: int,
    part_masks: list[torch.Tensor],
    advantages: torch.Tensor,
    plan: LossPlan,
    *,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    rollout_logp: Optional[torch.Tensor] = None,
    chunk_tokens: Optional[int] = None,
    tiling: Optional[str] = None,
    dw_accum: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy loss of ``plan`` from hidden states and the LM-head weight, gradient finished in the forward.

    The caller (``cipo.fused_linear_policy_loss``) validates the inputs and prepares them; every token tensor is
    ``[T]`` on ``hidden``'s device, float ones in the compute dtype (fp32; fp64 for fp64 ``hidden``) and 0 outside
    ``mask``.

    Args:
        hidden: ``[T, H]`` fp32/bf16/fp16/fp64.  weight: ``[V, H]``, same dtype and device.
        targets: ``[T]`` int64 in ``[0, V)`` or -100 (never on a ``mask`` token).
        mask: ``[T]`` bool, the loss tokens.  seq_index: ``[T]`` int64, non-decreasing, in ``[0, num_seqs)``.
        part_masks: one ``[T]`` bool mask per part of ``plan`` (subsets of ``mask``).
        advantages: ``[T]`` per-token advantages.
        plan: the loss knobs (``plan.has_entropy`` is True: the entropy is always computed).
        old_logp: None means on-policy (``old_logp := logp`` detached, ratio 1).
        ref_logp: given exactly when ``plan.kl_estimator`` is set.  rollout_logp: needed when ``plan.tis_mode`` is.
        chunk_tokens: logits tile of ``chunk_tokens × V`` elements; None: ``_chunking.plan_chunks``' budget.
        tiling: ``"token"``, ``"vocab"`` or None (automatic, :func:`choose_tiling`).
        dw_accum: ``"fp32"``, ``"weight"`` or ``"auto"`` (:func:`resolve_dw_accum`).

    Returns:
        ``(loss, sums)``: a 0-dim tensor in the compute dtype whose backward populates the gradients of ``hidden``
        and ``weight``, and the float64 column sums (metrics: :meth:`LossPlan.metrics`).
    """
    if tiling not in (None, "token", "vocab"):
        raise ValueError(f"tiling must be 'token', 'vocab' or None; got {tiling!r}")
    if dw_accum not in ("auto", "fp32", "weight"):
        raise ValueError(f"dw_accum must be 'auto', 'fp32' or 'weight'; got {dw_accum!r}")
    device = hidden.device
    dtype = accum_dtype(hidden.dtype)
    dw_accum = resolve_dw_accum(dw_accum, device, weight.dtype)
    k = token_rows(targets, mask, seq_index, num_seqs, part_masks, advantages, plan, old_logp=old_logp,
                    ref_logp=ref_logp, rollout_logp=rollout_logp, dtype=dtype)
    k, rows = compact_rows(k)
    n_rows, n_vocab, n_hidden = k.targets.numel(), weight.shape[0], weight.shape[1]
    chunks = plan_chunks(n_rows, n_vocab, device, chunk_tokens)
    if chunk_tokens is None and dw_accum == "weight" and tiling != "vocab" and device.type == "cuda":
        rows_per_chunk = weight_accum_chunk_rows(n_vocab, weight.dtype)
        if rows_per_chunk > chunks.chunk_tokens:
            chunks = plan_chunks(n_rows, n_vocab, device, rows_per_chunk)
    chosen = tiling if tiling is not None else choose_tiling(n_rows, n_vocab, n_hidden, chunks, k, dw_accum,
                                                             weight.dtype)
    triton_path = HAS_TRITON and dtype != torch.float64 and use_triton(hidden, weight)
    if triton_path and not hidden.is_cuda:
        _check_interpreted()
    grad_on = torch.is_grad_enabled()
    setup = _Setup(tokens=k, plan=plan, rows=rows, chunks=chunks, tiling=chosen, triton_path=triton_path,
                   need_h=grad_on and hidden.requires_grad, need_w=grad_on and weight.requires_grad,
                   dw_accum=dw_accum)
    return _FusedLinearPolicyLoss.apply(hidden, weight, setup)
