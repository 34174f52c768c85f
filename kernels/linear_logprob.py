"""Per-token log-probabilities (and entropies) of an LM head without materialising ``[T, V]`` logits.

``linear_logprob(hidden [T, H], weight [V, H], targets [T], temperature, return_entropy)`` returns
``logp[t] = log softmax(hidden[t] @ weight.T / temperature)[targets[t]]`` and optionally the entropy of that
distribution, differentiable w.r.t. ``hidden`` and ``weight`` for arbitrary upstream gradients on both outputs.

Algorithm (drivers and tile-size rule in ``_chunking``)
-------------------------------------------------------
Logits are produced tile by tile by a GEMM into a reusable scratch buffer and consumed by epilogues; the tiling
is **vocab slabs** ``[T, Vb]`` when ``T ≤ V`` (the usual case) and **token chunks** ``[C, V]`` otherwise — the
one whose fp32 gradient accumulator is smaller (``dH``: ``T × H``, vs ``dW``: ``V × H``, 2.5 GiB at
V = 151936, H = 4096).

Forward: an online-statistics epilogue keeps, per row and with ``s = z / temperature``, the running maximum
``m``, ``d = Σ exp(s − m)``, ``a = Σ exp(s − m)·(s − m)`` and the target's ``s_t``, merging each block of
columns by rescaling (``a ← e^{m−m'}(a + (m − m')·d)``, ``d ← e^{m−m'}d``). It works across vocab slabs and
within complete rows alike. Finally ``log_norm = log d``, ``lse = m + log_norm``,
``entropy = log d − a/d`` (= ``lse − Σ p·s``, from shifted values so logits of size 1e4 do not cancel) and
``logp = (s_t − m) − log d``. Saved for backward: ``m``, ``log_norm`` and the entropy (``[T]`` each).

Backward: the *same* GEMM calls recompute each tile (same plan, same tiling: the logits match the forward's bit
for bit — with a different tiling they would differ by ~1 ulp of the logits, which at |logit| ~ 1e4 shows up as
a 1e-3 relative gradient error), and a gradient epilogue overwrites it in place with
``dz_j = (1/temperature)·[g_logp·(1[j = target] − p_j) − g_ent·p_j·(log p_j + H)]``, where
``log p_j = (s_j − m) − log_norm`` and ``−p_j(log p_j + H) = −p_j(s_j − Σ p·s)`` is ``dH/ds_j``. The gradient
GEMMs then consume the tile. FLOPs: 2·THV forward, 6·THV backward.

Semantics
---------
* Outputs are fp32 (fp64 when the inputs are fp64); inputs fp32/fp16/bf16/fp64, all math in fp32 (fp64).
* ``targets == -100``: ``logp = 0`` and no gradient flows through that ``logp``. Entropy is a property of the
  distribution, so it is computed for *every* row, ignored ones included, and its gradient flows for them too
  (mask it upstream if you do not want it).
* ``T = 0`` gives empty outputs and zero gradients.
* Extra memory: one logits tile (``plan_chunks``: 256 MiB of fp32 on CUDA, 64 MiB on CPU, or ``chunk_tokens × V``
  elements), one fp32 accumulator (above), for fp32-logit half inputs a half copy of the tile, ``[T]`` vectors;
  the torch epilogues add up to two fp32 tile-sized temporaries (with entropy; one without).
* Input checks raise ``ValueError`` naming the argument and its shape; the target range check reads the targets
  on the host (one device sync per call).

Implementations
---------------
Epilogues come in two interchangeable flavours with identical formulas: Triton kernels (CUDA tensors, or CPU
tensors under ``CIPO_FORCE_TRITON=1`` + ``TRITON_INTERPRET=1``, see ``_dispatch.use_triton``) and chunked torch
(the CPU path, same memory bound; in :mod:`.linear_logprob_torch`). fp64 inputs always take the torch epilogues
(the kernels compute in fp32). GEMMs are torch (cuBLAS / CPU BLAS) on both paths. Triton kernels convert to fp32
right after each load (the interpreter's bf16 arithmetic is wrong), use plain pointer arithmetic and hand-picked
block sizes (no autotune).
Races: a statistics program owns ``BLOCK_R`` rows (their state and their part of the tile), a gradient program
owns one ``[BLOCK_R, BLOCK_V]`` block of the tile, which it reads then overwrites; no two programs touch the
same memory. Cross-tile gradient sums are done by the GEMMs, one tile after another (stream order).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from ._chunking import ChunkPlan, accum_dtype, plan_chunks, smaller_accumulator_axis, tile_pass
from ._dispatch import NO_FP_FUSION, use_triton
from .linear_logprob_torch import IGNORE_INDEX, OnlineRowStats, softmax_grad_torch_, update_row_stats_torch_

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs without triton still get the chunked torch path
    HAS_TRITON = False

__all__ = ["IGNORE_INDEX", "OnlineRowStats", "linear_logprob", "softmax_grad_", "update_row_stats_"]


# ---------------------------------------------------------------------------------------------------------------
# Triton epilogues
# ---------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _row_stats_kernel(
        z_ptr,
        stride_z,
        n_rows,
        n_cols,
        col_offset,
        tgt_ptr,
        max_ptr,
        sum_ptr,
        dot_ptr,
        st_ptr,
        inv_temp,
        WANT_ENT: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """Merge the columns of ``z [n_rows, n_cols]`` (vocab ids ``col_offset + j``) into the running state."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        base = z_ptr + rows.to(tl.int64) * stride_z
        m = tl.load(max_ptr + rows, mask=rmask, other=-3.0e38)
        d = tl.load(sum_ptr + rows, mask=rmask, other=0.0)
        a = tl.zeros([BLOCK_R], dtype=tl.float32)
        if WANT_ENT:
            a = tl.load(dot_ptr + rows, mask=rmask, other=0.0)
        for v0 in range(0, n_cols, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = rmask[:, None] & (cols < n_cols)[None, :]
            s = tl.load(base[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(s, axis=1))
            rescale = tl.exp(m - m_new)
            sh = s - m_new[:, None]
            e = tl.exp(sh)  # 0 where masked (sh = -inf)
            if WANT_ENT:
                a = rescale * (a + (m - m_new) * d) + tl.sum(e * tl.where(mask, sh, 0.0), axis=1)
            d = d * rescale + tl.sum(e, axis=1)
            m = m_new
        tl.store(max_ptr + rows, m, mask=rmask)
        tl.store(sum_ptr + rows, d, mask=rmask)
        if WANT_ENT:
            tl.store(dot_ptr + rows, a, mask=rmask)
        tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-100)
        local = tgt - col_offset
        hit = rmask & (tgt != -100) & (local >= 0) & (local < n_cols)
        s_t = tl.load(base + tl.where(hit, local, 0), mask=hit, other=0.0).to(tl.float32) * inv_temp
        tl.store(st_ptr + rows, s_t, mask=hit)

    @triton.jit
    def _softmax_grad_kernel(
        z_ptr,
        stride_z,
        n_rows,
        n_cols,
        col_offset,
        tgt_ptr,
        max_ptr,
        lognorm_ptr,
        ent_ptr,
        glogp_ptr,
        gent_ptr,
        inv_temp,
        HAS_GLOGP: tl.constexpr,
        HAS_GENT: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """Overwrite one ``[BLOCK_R, BLOCK_V]`` block of logits with dL/dz in place (formula: module docstring)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        rmask = rows < n_rows
        mask = rmask[:, None] & (cols < n_cols)[None, :]
        ptrs = z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :]
        z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(max_ptr + rows, mask=rmask, other=0.0)
        log_d = tl.load(lognorm_ptr + rows, mask=rmask, other=0.0)
        # (s − m) − log d rather than s − lse: at |s| ~ 1e4 rounding lse alone would put ~1e-3 into log p.
        # Masked lanes get logp = 0, p = 0: no overflow, no NaN, nothing stored.
        logp = tl.where(mask, (z * inv_temp - m[:, None]) - log_d[:, None], 0.0)
        p = tl.where(mask, tl.exp(logp), 0.0)
        dz = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.float32)
        if HAS_GLOGP:
            g = tl.load(glogp_ptr + rows, mask=rmask, other=0.0)  # already 0 on ignored rows
            tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-100)
            hit = (cols[None, :] + col_offset) == tgt[:, None]
            dz = g[:, None] * (tl.where(hit, 1.0, 0.0) - p)
        if HAS_GENT:
            ge = tl.load(gent_ptr + rows, mask=rmask, other=0.0)
            h = tl.load(ent_ptr + rows, mask=rmask, other=0.0)
            dz = dz - ge[:, None] * p * (logp + h[:, None])
        tl.store(ptrs, (dz * inv_temp).to(z_ptr.dtype.element_ty), mask=mask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block_config(n_rows: int, n_cols: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps). GPU: one row per program, 4096-wide fp32 blocks (16 elements per thread
    at 8 warps). Interpreter: its cost grows with the number of ops, so take up to 64K-element blocks."""
    if on_gpu:
        block_v = min(4096, _next_pow2(n_cols))
        return 1, block_v, 8 if block_v >= 2048 else 4
    block_v = min(16384, _next_pow2(n_cols))
    return min(_next_pow2(n_rows), max(1, 65536 // block_v)), block_v, 4


# ---------------------------------------------------------------------------------------------------------------
# Online row statistics (forward)
# ---------------------------------------------------------------------------------------------------------------


def _update_row_stats_triton_(
    z: torch.Tensor, col_offset: int, targets: torch.Tensor, inv_temp: float, st: OnlineRowStats
) -> None:
    n_rows, n_cols = z.shape
    if n_rows == 0 or n_cols == 0:
        return
    block_r, block_v, warps = _block_config(n_rows, n_cols, z.is_cuda)
    _row_stats_kernel[(triton.cdiv(n_rows, block_r),)](
        z, z.stride(0), n_rows, n_cols, col_offset, targets,
        st.row_max, st.sum_exp, st.row_max if st.dot is None else st.dot, st.target_logit, inv_temp,
        WANT_ENT=st.dot is not None, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps, **NO_FP_FUSION,
    )  # fmt: skip


def update_row_stats_(
    z: torch.Tensor,
    col_offset: int,
    targets: torch.Tensor,
    inv_temp: float,
    stats: OnlineRowStats,
    *,
    triton_path: bool,
) -> None:
    """Merge a logits tile into the running row statistics; ``z`` is left unchanged.

    Args:
        z: ``[R, Vt]`` contiguous logits of vocab columns ``col_offset : col_offset + Vt`` (fp32, fp16, bf16 or
            fp64); a complete row is the case ``col_offset = 0, Vt = V``.
        targets: ``[R]`` int64 contiguous, in ``[0, V)`` or ``-100``.
        inv_temp: ``1 / temperature``.
        stats: ``[R]`` state (``OnlineRowStats.empty`` or a ``.rows(...)`` view), updated in place.
        triton_path: use the Triton kernel (ignored for fp64 tiles, which always take torch).
    """
    if triton_path and HAS_TRITON and z.dtype != torch.float64:
        _update_row_stats_triton_(z, col_offset, targets, inv_temp, stats)
    else:
        update_row_stats_torch_(z, col_offset, targets, inv_temp, stats)


# ---------------------------------------------------------------------------------------------------------------
# Softmax gradient (backward)
# ---------------------------------------------------------------------------------------------------------------


def _softmax_grad_triton_(
    z: torch.Tensor,
    col_offset: int,
    targets: torch.Tensor,
    inv_temp: float,
    row_max: torch.Tensor,
    log_norm: torch.Tensor,
    ent: torch.Tensor | None,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
) -> None:
    n_rows, n_cols = z.shape
    if n_rows == 0 or n_cols == 0:
        return
    block_r, block_v, warps = _block_config(n_rows, n_cols, z.is_cuda)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_v))
    _softmax_grad_kernel[grid](
        z, z.stride(0), n_rows, n_cols, col_offset, targets, row_max, log_norm,
        row_max if ent is None else ent, row_max if g_logp is None else g_logp, row_max if g_ent is None else g_ent,
        inv_temp,
        HAS_GLOGP=g_logp is not None, HAS_GENT=g_ent is not None,
        BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps, **NO_FP_FUSION,
    )  # fmt: skip


def softmax_grad_(
    z: torch.Tensor,
    col_offset: int,
    targets: torch.Tensor,
    inv_temp: float,
    row_max: torch.Tensor,
    log_norm: torch.Tensor,
    ent: torch.Tensor | None,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    *,
    triton_path: bool,
) -> None:
    """Overwrite a logits tile in place with ``dL/dz`` given upstream grads on logp and entropy.

    Args:
        z: ``[R, Vt]`` contiguous logits of vocab columns ``col_offset : col_offset + Vt`` (partial rows are fine),
            computed by the same GEMM call as the forward's (see the module docstring).
        targets: ``[R]`` int64.
        row_max, log_norm, ent: ``[R]`` from ``OnlineRowStats`` / ``finalize`` (``ent`` only with ``g_ent``).
        g_logp: ``[R]`` upstream grad of logp, already 0 on ignored rows, or None.
        g_ent: ``[R]`` upstream grad of the entropy, or None. At least one of the two must be given.
        triton_path: use the Triton kernel (ignored for fp64 tiles).
    """
    if triton_path and HAS_TRITON and z.dtype != torch.float64:
        _softmax_grad_triton_(z, col_offset, targets, inv_temp, row_max, log_norm, ent, g_logp, g_ent)
    else:
        softmax_grad_torch_(z, col_offset, targets, inv_temp, row_max, log_norm, ent, g_logp, g_ent)


# ---------------------------------------------------------------------------------------------------------------
# Autograd function and public API
# ---------------------------------------------------------------------------------------------------------------


class _LinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        inv_temp: float,
        want_entropy: bool,
        plan: ChunkPlan,
        axis: str,
        triton_path: bool,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        stats = OnlineRowStats.empty(hidden.shape[0], accum_dtype(hidden.dtype), hidden.device, want_entropy)

        def epilogue(z: torch.Tensor, rows: slice, cols: slice) -> None:
            update_row_stats_(z, cols.start, targets[rows], inv_temp, stats.rows(rows), triton_path=triton_path)

        tile_pass(axis, hidden, weight, plan, epilogue)
        logp, log_norm, ent = stats.finalize(targets)
        ctx.save_for_backward(hidden, weight, targets, stats.row_max, log_norm, ent)
        ctx.set_materialize_grads(False)
        ctx.inv_temp, ctx.want_entropy, ctx.plan, ctx.axis, ctx.triton_path = (
            inv_temp, want_entropy, plan, axis, triton_path
        )  # fmt: skip
        return (logp, ent) if want_entropy else logp

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, targets, row_max, log_norm, ent = ctx.saved_tensors
        g_logp = grads[0]
        g_ent = grads[1] if ctx.want_entropy else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none_rest = (None,) * 6
        if (g_logp is None and g_ent is None) or not (need_h or need_w):
            return (None, None) + none_rest
        if g_logp is not None:
            g_logp = torch.where(targets != IGNORE_INDEX, g_logp.to(row_max.dtype), 0.0).contiguous()
        if g_ent is not None:
            g_ent = g_ent.to(row_max.dtype).contiguous()
        inv_temp, triton_path = ctx.inv_temp, ctx.triton_path

        def epilogue(z: torch.Tensor, rows: slice, cols: slice) -> None:
            softmax_grad_(
                z, cols.start, targets[rows], inv_temp, row_max[rows], log_norm[rows],
                None if ent is None else ent[rows],
                None if g_logp is None else g_logp[rows],
                None if g_ent is None else g_ent[rows],
                triton_path=triton_path,
            )  # fmt: skip

        d_hidden, d_weight = tile_pass(
            ctx.axis, hidden, weight, ctx.plan, epilogue, grad_hidden=need_h, grad_weight=need_w
        )
        return (d_hidden, d_weight) + none_rest


def _check_interpreted() -> None:
    """CPU tensors on the Triton path need kernels built by the interpreter, which ``@triton.jit`` decides when
    this module is imported."""
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(_row_stats_kernel, InterpretedFunction):
        raise RuntimeError(
            "cipo.kernels.linear_logprob was imported before TRITON_INTERPRET=1 was set, so its Triton kernels "
            "cannot run on CPU tensors; set TRITON_INTERPRET=1 before importing cipo"
        )


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _validate(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    """Check the inputs; return ``1 / temperature``. Raises ``ValueError`` naming the argument and its shape."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2 or not hidden.dtype.is_floating_point:
        raise ValueError(
            f"hidden must be a 2-D floating tensor [T, H] (flatten batch dims first); "
            f"got shape {_shape(hidden)} dtype {hidden.dtype}"
        )
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(
            f"weight must be a 2-D floating tensor [V, H]; got shape {_shape(weight)} dtype {weight.dtype}"
        )
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[1] = {hidden.shape[1]}; got weight shape {_shape(weight)} "
            f"for hidden shape {_shape(hidden)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have at least one vocabulary row; got shape {_shape(weight)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight dtype {weight.dtype} (shape {_shape(weight)}) must match hidden dtype {hidden.dtype} "
            f"(shape {_shape(hidden)})"
        )
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must be 1-D [T] with T = {hidden.shape[0]}; got shape {_shape(targets)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor; got dtype {targets.dtype} shape {_shape(targets)}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"hidden {_shape(hidden)}, weight {_shape(weight)} and targets {_shape(targets)} must share a device; "
            f"got {hidden.device}, {weight.device}, {targets.device}"
        )
    n_vocab = weight.shape[0]
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= n_vocab))
    if targets.numel() and bool(bad.any()):
        example = int(targets[bad][0])
        raise ValueError(
            f"targets (shape {_shape(targets)}) must lie in [0, {n_vocab}) or equal {IGNORE_INDEX}; found {example}"
        )
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return 1.0 / temperature


def _linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_tokens: int | None = None,
    axis: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``linear_logprob`` with the tiling selectable (``"vocab"``, ``"token"``, or None: by accumulator size)."""
    inv_temp = _validate(hidden, weight, targets, temperature)
    n_tokens, n_vocab = hidden.shape[0], weight.shape[0]
    plan = plan_chunks(n_tokens, n_vocab, hidden.device, chunk_tokens)
    axis = smaller_accumulator_axis(n_tokens, n_vocab) if axis is None else axis
    if axis not in ("vocab", "token"):
        raise ValueError(f"axis must be 'vocab', 'token' or None, got {axis!r}")
    triton_path = HAS_TRITON and hidden.dtype != torch.float64 and use_triton(hidden, weight)
    if triton_path and not hidden.is_cuda:
        _check_interpreted()
    return _LinearLogprob.apply(
        hidden, weight, targets.long().contiguous(), inv_temp, bool(return_entropy), plan, axis, triton_path
    )


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    chunk_tokens: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log softmax(hidden @ weight.T / temperature)[targets]``, tiled (never ``[T, V]``).

    Args:
        hidden: ``[T, H]`` fp32/bf16/fp16 (fp64 for reference-grade checks), any strides.
        weight: ``[V, H]`` LM-head weight, same dtype and device as ``hidden``.
        targets: ``[T]`` integer token ids in ``[0, V)``, or ``-100`` to ignore a token.
        temperature: logits are divided by it (> 0), as in the rollout engine.
        return_entropy: also return the entropy of ``softmax(logits / temperature)`` for every row.
        chunk_tokens: logits tile of ``chunk_tokens × V`` elements (``chunk_tokens`` rows per token chunk, or
            ``chunk_tokens × V / T`` columns per vocab slab); None picks it from a memory budget (256 MiB of fp32
            logits on CUDA, 64 MiB on CPU).
    Returns:
        ``logp [T]`` fp32 (fp64 for fp64 inputs), 0 on ignored rows; with ``return_entropy`` the tuple
        ``(logp, entropy)``. Differentiable w.r.t. ``hidden`` and ``weight`` for any upstream gradients.
    Raises:
        ValueError: on wrong shapes/dtypes/devices, targets outside ``[0, V)`` other than -100, temperature <= 0.
    """
    return _linear_logprob(hidden, weight, targets, temperature, return_entropy, chunk_tokens)
