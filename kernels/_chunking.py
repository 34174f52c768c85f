"""Tile drivers for LM-head losses that never hold the full ``[T, V]`` logits.

Shared by ``linear_logprob`` and the fused linear policy loss. A *tile* of logits ``z = h @ W.T`` is
produced by one GEMM into a reusable scratch buffer, handed to an *epilogue* (Triton or torch, interchangeable)
that reduces it and/or overwrites it in place with ``dL/dz``, and then, when gradients are wanted, fed to the
two gradient GEMMs. Two tilings:

* **token chunks** (``token_chunk_pass``): rows ``r0:r1`` of ``hidden`` × all of ``W`` → tile ``[C, V]``. Every
  row of the tile is complete, so one epilogue can compute row statistics *and* finish a per-token loss and its
  gradient in a single pass (the fused policy loss). Gradients: ``dH[r0:r1] = dZ @ W`` is final,
  ``dW += dZᵀ @ h_c`` is accumulated over chunks (fp32 accumulator ``V × H``: 2.5 GiB at V=151936, H=4096; none
  for one chunk or a sum in the weight dtype). Chunks may also follow sequence boundaries (``chunk_bounds``) and
  cover gathered rows of a larger input (the fused loss's loss rows).
* **vocab slabs** (``vocab_slab_pass``): all rows × columns ``v0:v1`` of ``W`` → tile ``[T, Vb]``. Rows are
  partial: the epilogue merges online statistics across slabs, or computes ``dL/dz`` from statistics known
  beforehand. Gradients: ``dW[v0:v1] = dZᵀ @ h`` is final (one GEMM with ``K = T``, fp32 accumulation inside the
  GEMM, written once in the weight's dtype), ``dH += dZ @ W_s`` is accumulated (fp32 accumulator ``T × H``:
  128 MiB at T=8192, H=4096).

``smaller_accumulator_axis`` picks the tiling with the smaller accumulator (vocab slabs when ``T ≤ V``). A forward
and its recomputing backward must use the same plan and tiling: the GEMM calls are then identical and the
recomputed logits equal the forward's bit for bit (same shapes, same library, deterministic GEMMs).

GEMM dtypes. fp32 (and fp64) inputs: tiles are fp32 (fp64) and every GEMM accumulates in that dtype. fp16/bf16
inputs: on CUDA the logits GEMM writes fp32 directly (``torch.mm(..., out_dtype=torch.float32)``, detected at
first use and checked against an fp32 product) so logits are never rounded to 16 bits; elsewhere (every CPU build
of torch 2.13, or a CUDA build without the overload) the tile is in the input dtype — the same rounding as
torch's own half path — and the epilogues convert to fp32 on load. ``dZ`` enters the gradient GEMMs in the
input dtype (as in torch's own half path); they accumulate in fp32 internally, and cross-tile sums are in an
fp32 buffer. ``.float()`` on the operands was not chosen: it would copy all of ``W`` (or each slab) to fp32 for
every tile.

Tile size rule (``plan_chunks``): a logits tile holds at most ``TILE_BYTES / 4`` elements — 256 MiB on CUDA
(V = 151936: 441 → 384 rows per token chunk; T = 8192: 8192 columns per vocab slab) and 64 MiB on CPU. Rows per
chunk are rounded down to a multiple of 64 (from 128 up) and columns per slab to a multiple of 128 (from 256 up),
never below 1 and never beyond ``T`` / ``V``. ``chunk_tokens`` overrides it: the tile becomes
``chunk_tokens × V`` elements, i.e. ``chunk_tokens`` rows or ``chunk_tokens × V // T`` columns, unrounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

#: Byte budget of one logits tile (fp32 elements × 4) by device type.
TILE_BYTES = {"cuda": 256 * 2**20, "cpu": 64 * 2**20}

#: ``epilogue(z, rows, cols)``: ``z`` is the logits tile ``hidden[rows] @ weight[cols].T`` ``[len(rows), len(cols)]``.
#: Gradient passes expect it to overwrite ``z`` in place with ``dL/dz`` (same shape and dtype); a token-chunk
#: epilogue may instead return ``dL/dz`` written elsewhere (None: it is in ``z``).
TileEpilogue = Callable[[torch.Tensor, slice, slice], Optional[torch.Tensor]]


@dataclass(frozen=True)
class ChunkPlan:
    """How a ``[T, V]`` logits matrix is tiled.

    Attributes:
        tile_elems: maximum elements of one logits tile (the scratch buffer size).
        chunk_tokens: rows per token chunk (tile ``[chunk_tokens, V]``).
        vocab_slab: columns per vocab slab (tile ``[T, vocab_slab]``).
    """

    tile_elems: int
    chunk_tokens: int
    vocab_slab: int


def _round_down(x: int, multiple: int, threshold: int) -> int:
    """Round ``x`` down to a multiple of ``multiple`` once ``x >= threshold``; never below 1."""
    if x >= threshold:
        x -= x % multiple
    return max(1, x)


def plan_chunks(n_tokens: int, n_vocab: int, device: torch.device, chunk_tokens: int | None = None) -> ChunkPlan:
    """Choose tile sizes for ``n_tokens × n_vocab`` logits on ``device`` (see the module docstring for the rule)."""
    if chunk_tokens is not None:
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
        tile_elems = chunk_tokens * max(n_vocab, 1)
        rows = chunk_tokens
        cols = max(1, tile_elems // max(n_tokens, 1))
    else:
        tile_elems = TILE_BYTES["cuda" if device.type == "cuda" else "cpu"] // 4
        rows = _round_down(tile_elems // max(n_vocab, 1), 64, 128)
        cols = _round_down(tile_elems // max(n_tokens, 1), 128, 256)
    rows = max(1, min(rows, n_tokens))
    cols = max(1, min(cols, n_vocab))
    return ChunkPlan(tile_elems=max(tile_elems, rows * n_vocab, n_tokens * cols), chunk_tokens=rows, vocab_slab=cols)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# GEMM helpers
# ---------------------------------------------------------------------------------------------------------------

_OUT_DTYPE_OK: dict[tuple[str, int | None, torch.dtype], bool] = {}


def _mm_out_dtype_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32, out=buf)`` works for half ``a, b`` on ``device``.

    Checked once per (device, dtype) on a small product against an fp32 matmul, so a build that lacks the
    overload (every CPU build of torch 2.13) or computes it differently silently falls back to half logits.
    """
    key = (device.type, device.index, dtype)
    if key not in _OUT_DTYPE_OK:
        ok = False
        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            try:
                gen = torch.Generator(device="cpu").manual_seed(0)
                a = torch.randn(48, 80, generator=gen).to(device=device, dtype=dtype)
                b = torch.randn(40, 80, generator=gen).to(device=device, dtype=dtype)
                buf = torch.empty(48 * 40 + 7, device=device, dtype=torch.float32)
                view = buf[: 48 * 40].view(48, 40)
                torch.mm(a, b.t(), out_dtype=torch.float32, out=view)
                ref = a.float() @ b.float().t()
                ok = bool(torch.allclose(view, ref, rtol=1e-3, atol=1e-3))
            except (RuntimeError, TypeError):
                ok = False
        _OUT_DTYPE_OK[key] = ok
    return _OUT_DTYPE_OK[key]


def logits_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """dtype of the logits tiles for inputs of ``dtype`` on ``device`` (see the module docstring)."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    return torch.float32 if _mm_out_dtype_supported(device, dtype) else dtype


def tile_view(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Contiguous ``[rows, cols]`` view of the front of the flat scratch buffer ``buf``."""
    return buf[: rows * cols].view(rows, cols)


def logits_tile(h: torch.Tensor, w: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``h @ w.T`` written into the scratch buffer ``buf`` (flat, dtype from ``logits_dtype``).

    Args:
        h: ``[R, H]`` hidden rows.  w: ``[Vt, H]`` weight rows (same dtype as ``h``).
        buf: flat scratch of at least ``R * Vt`` elements.
    Returns:
        ``[R, Vt]`` contiguous view of ``buf``.
    """
    z = tile_view(buf, h.shape[0], w.shape[0])
    if buf.dtype == h.dtype:
        torch.mm(h, w.t(), out=z)
    else:  # half inputs, fp32 logits
        torch.mm(h, w.t(), out_dtype=buf.dtype, out=z)
    return z


def gemm_operand(dz: torch.Tensor, dtype: torch.dtype, buf: torch.Tensor | None) -> torch.Tensor:
    """``dz`` in the GEMM operand dtype ``dtype``: itself when it already is, else cast into the flat ``buf``."""
    if dz.dtype == dtype:
        return dz
    assert buf is not None
    out = tile_view(buf, dz.shape[0], dz.shape[1])
    out.copy_(dz)
    return out


def addmm_acc_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, max_temp_elems: int) -> None:
    """``acc += a @ b`` with ``acc`` in the accumulation dtype and ``a, b`` possibly half.

    Same dtypes: one in-place ``addmm_``. Half operands: the product is formed in row blocks (temporaries of at
    most ``max_temp_elems`` elements, fp32 on CUDA when supported) and added to ``acc``, so the cross-tile sum is
    fp32 and the temporary stays within the tile budget.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    f32_out = _mm_out_dtype_supported(a.device, a.dtype)
    step = max(1, max_temp_elems // max(b.shape[1], 1))
    for r0 in range(0, a.shape[0], step):
        r1 = min(r0 + step, a.shape[0])
        prod = torch.mm(a[r0:r1], b, out_dtype=acc.dtype) if f32_out else torch.mm(a[r0:r1], b)
        acc[r0:r1].add_(prod)


# ---------------------------------------------------------------------------------------------------------------
# Passes
# ---------------------------------------------------------------------------------------------------------------


def chunk_bounds(n_tokens: int, chunk_rows: int, seq_index: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """Row ranges of token chunks: fixed ``chunk_rows``, or — given ``seq_index [T]`` (non-decreasing) — greedy runs
    of whole sequences, a sequence longer than ``chunk_rows`` getting a chunk of its own."""
    if seq_index is None:
        return [(r0, min(r0 + chunk_rows, n_tokens)) for r0 in range(0, n_tokens, chunk_rows)]
    _, counts = torch.unique_consecutive(seq_index, return_counts=True)
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


def token_chunk_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    plan: ChunkPlan,
    epilogue: TileEpilogue,
    *,
    grad_hidden: bool = False,
    grad_weight: bool = False,
    bounds: list[tuple[int, int]] | None = None,
    dw_accum: str = "fp32",
    out_rows: torch.Tensor | None = None,
    n_out_rows: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Walk ``hidden`` in chunks of rows; each tile is ``[C, V]`` (complete rows).

    Args:
        hidden: ``[T, H]`` fp32/fp16/bf16/fp64.  weight: ``[V, H]``, same dtype.
        plan: tile sizes (``plan.chunk_tokens`` rows per chunk, ``plan.tile_elems`` scratch elements).
        epilogue: called as ``epilogue(z, slice(r0, r1), slice(0, V))``; with any ``grad_*`` it leaves ``dL/dz`` in
            ``z`` or returns it (a ``[C, V]`` tensor, e.g. written straight into a weight-dtype GEMM operand).
        grad_hidden, grad_weight: which gradients to form from the ``dZ`` tiles.
        bounds: the chunks' row ranges (:func:`chunk_bounds`); default: ``plan.chunk_tokens`` rows each.
        dw_accum: the cross-chunk ``dW`` sum: ``"fp32"`` (in the accumulation dtype, an extra ``V × H`` buffer
            when there is more than one chunk) or ``"weight"`` (in the weight dtype, in place: no buffer).
        out_rows, n_out_rows: ``hidden``'s rows are rows ``out_rows [T]`` of an ``[n_out_rows, H]`` input (the loss
            rows gathered from it): ``dH`` is that input's gradient, 0 on the other rows.
    Returns:
        ``(dH in hidden.dtype | None, dW [V, H] in weight.dtype | None)``. The first chunk's GEMM writes ``dW``
        when there is no separate accumulator (no zero fill, no read of zeros); later chunks add to it.
    """
    n_tokens, n_hidden = hidden.shape
    n_vocab = weight.shape[0]
    device = hidden.device
    bounds = chunk_bounds(n_tokens, plan.chunk_tokens) if bounds is None else bounds
    max_rows = max((r1 - r0 for r0, r1 in bounds), default=0)
    need_grads = grad_hidden or grad_weight
    zbuf = torch.empty(max_rows * n_vocab, dtype=logits_dtype(hidden.dtype, device), device=device)
    obuf: torch.Tensor | None = None  # the weight-dtype GEMM operand, when an epilogue leaves dL/dz in a wider tile
    d_hidden = None
    if grad_hidden:
        # contiguous whatever hidden's strides (empty_like would copy them): row slices below are GEMM outputs
        d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if out_rows is None else \
            torch.zeros((n_out_rows, n_hidden), dtype=hidden.dtype, device=device)
    d_weight = d_weight_acc = None
    direct = len(bounds) == 1 or dw_accum == "weight"
    if grad_weight:
        if direct:
            d_weight = torch.empty(weight.shape, dtype=weight.dtype, device=device)
        else:
            d_weight_acc = torch.zeros(weight.shape, dtype=accum_dtype(weight.dtype), device=device)
    dw_written = False
    for r0, r1 in bounds:
        h_c = hidden[r0:r1]
        z = logits_tile(h_c, weight, zbuf)
        dz = epilogue(z, slice(r0, r1), slice(0, n_vocab))
        if not need_grads:
            continue
        dz = z if dz is None else dz
        if dz.dtype != weight.dtype and obuf is None:
            obuf = torch.empty(zbuf.numel(), dtype=weight.dtype, device=device)
        dz = gemm_operand(dz, weight.dtype, obuf)
        if d_hidden is not None and out_rows is None:
            torch.mm(dz, weight, out=d_hidden[r0:r1])
        elif d_hidden is not None:
            d_hidden.index_copy_(0, out_rows[r0:r1], torch.mm(dz, weight))
        if d_weight_acc is not None:
            addmm_acc_(d_weight_acc, dz.t(), h_c, plan.tile_elems)
        elif d_weight is not None and not dw_written:
            torch.mm(dz.t(), h_c, out=d_weight)
            dw_written = True
        elif d_weight is not None:
            d_weight.addmm_(dz.t(), h_c)  # the sum in the weight dtype (dw_accum="weight")
    if d_weight_acc is not None:
        d_weight = d_weight_acc.to(weight.dtype)
    elif d_weight is not None and not dw_written:  # no rows: no chunk ran
        d_weight.zero_()
    return d_hidden, d_weight


def vocab_slab_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    plan: ChunkPlan,
    epilogue: TileEpilogue,
    *,
    grad_hidden: bool = False,
    grad_weight: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Walk ``weight`` in slabs of ``plan.vocab_slab`` rows; each tile is ``[T, Vb]`` (all tokens, partial rows).

    The epilogue is called as ``epilogue(z, slice(0, T), slice(v0, v1))``. Because rows are partial it either
    merges online statistics across slabs (forward) or turns logits into ``dL/dz`` from per-row statistics known
    beforehand (backward). The GEMM calls are exactly those of a previous pass with the same plan, so recomputed
    logits match the forward's bit for bit.

    Returns:
        ``(dH [T, H] in hidden.dtype | None, dW [V, H] in weight.dtype | None)``; each ``dW`` slab is one GEMM
        written straight into the result, ``dH`` is accumulated over slabs in the accumulation dtype.
    """
    n_tokens = hidden.shape[0]
    n_vocab = weight.shape[0]
    ldt = logits_dtype(hidden.dtype, hidden.device)
    acc_dt = accum_dtype(hidden.dtype)
    need_grads = grad_hidden or grad_weight
    zbuf = torch.empty(min(plan.tile_elems, n_tokens * plan.vocab_slab), dtype=ldt, device=hidden.device)
    obuf = torch.empty_like(zbuf, dtype=weight.dtype) if need_grads and ldt != weight.dtype else None
    d_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if grad_weight else None
    d_hidden_acc = torch.zeros(hidden.shape, dtype=acc_dt, device=hidden.device) if grad_hidden else None
    for v0 in range(0, n_vocab, plan.vocab_slab):
        v1 = min(v0 + plan.vocab_slab, n_vocab)
        w_s = weight[v0:v1]
        z = logits_tile(hidden, w_s, zbuf)
        epilogue(z, slice(0, n_tokens), slice(v0, v1))
        if not need_grads:
            continue
        dz = gemm_operand(z, weight.dtype, obuf)
        if d_weight is not None:
            torch.mm(dz.t(), hidden, out=d_weight[v0:v1])
        if d_hidden_acc is not None:
            addmm_acc_(d_hidden_acc, dz, w_s, plan.tile_elems)
    d_hidden = None if d_hidden_acc is None else d_hidden_acc.to(hidden.dtype)
    return d_hidden, d_weight


def tile_pass(
    axis: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    plan: ChunkPlan,
    epilogue: TileEpilogue,
    *,
    grad_hidden: bool = False,
    grad_weight: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``token_chunk_pass`` (``axis="token"``) or ``vocab_slab_pass`` (``axis="vocab"``)."""
    if axis == "token":
        return token_chunk_pass(hidden, weight, plan, epilogue, grad_hidden=grad_hidden, grad_weight=grad_weight)
    if axis == "vocab":
        return vocab_slab_pass(hidden, weight, plan, epilogue, grad_hidden=grad_hidden, grad_weight=grad_weight)
    raise ValueError(f"axis must be 'token' or 'vocab', got {axis!r}")


def smaller_accumulator_axis(n_tokens: int, n_vocab: int) -> str:
    """Tiling whose fp32 gradient accumulator is smaller: ``"vocab"`` (``T × H``) if ``T ≤ V``, else ``"token"``."""
    return "vocab" if n_tokens <= n_vocab else "token"
