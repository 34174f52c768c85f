"""Per-token policy-loss math shared by the Triton kernels: the ``@triton.jit`` helpers :func:`policy_token_terms`
and :func:`store_partial_sums` (the partial-sum columns of ``_loss_plan``, written once for both kernels).

Callers: ``policy_loss._policy_loss_fwd_kernel`` (loss from per-token log-probs) and
``fused_linear_policy_loss._fused_epilogue_kernel`` (loss straight from the logits tile). Each loads its inputs,
calls the helper on a block of tokens (any shape) in fp32, then stores its partial sums (``Σ_p c_p·pg``,
``Σ_p c_p·kl``, ``Σ_p c_p·H``, metric counts) with :func:`store_partial_sums` and ``g_logp = c_total · dl``.

Formulas (docs/DESIGN.md §4, exactly as :mod:`.policy_loss_torch` states them; this module only changes *how* they are
evaluated), per token, with ``Δ = logp − old``:

* ratio ``ρ = exp(clamp(Δ, ±RATIO_CLAMP))`` (±20);
* clipped surrogate (clip / clip-higher) ``Lc = max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high))``; the caller passes
  ``clip_low = 1−ε_low``, ``clip_high = 1+ε_high``;
* dual clip (``DUAL_CLIP``): ``pg = min(Lc, −A·c)`` where ``A < 0``, else ``pg = Lc``;
* truncated IS (``TIS_MODE`` 1 = token, 2 = sequence): ``pg ← pg·w`` with ``w = min(exp(log_w), C)`` computed as
  ``exp(min(log_w, log C))`` (no overflow). Token mode: ``log_w = old − rollout`` on masked tokens (0 elsewhere),
  ``tis_in`` is the rollout log-prob. Sequence mode: ``tis_in`` *is* the per-token log-weight (the masked
  per-sequence sum of ``old − rollout``, computed by the caller in float64 and gathered back to tokens);
* precomputed importance weights (``HAS_IS_W``): ``pg ← pg·is_w``, a constant for the gradient;
* KL estimate of ``logp`` against ``ref`` (``KL_MODE`` 1 = k1, 2 = k2, 3 = k3, 4 = abs), ``diff = logp − ref``:
  k1 ``diff``; k2 ``½·diff²``; k3 ``clamp(eˣ − x − 1, ±K3_Y_CLAMP)`` with ``x = clamp(−diff, ±K3_X_CLAMP)``;
  abs ``|diff|``; with ``KL_ST`` (verl's ``k1+``, ``k3+``, ``abs+``: straight-through) the value is that
  estimator's and the derivative k2's, ``diff``;
* ``dl = dℓ/dlogp`` of ``ℓ = pg + β·kl`` (β = ``kl_coef`` only when ``KL_IN_LOSS``; the entropy term is the
  caller's, its derivative w.r.t. ``logp`` is 0).

Returns ``(pg, kl, dl, neg_log_ratio, clipped, clipped_lower, tis_capped)``: ``pg`` (dual-clipped, TIS-weighted),
``kl`` (0 when ``KL_MODE == 0``), ``dl``, ``−clamp(Δ, ±20)`` (the ``approx_kl`` metric term) and the metric flags
``clipped = −A·clip(ρ) > −A·ρ``, ``clipped_lower = A < 0 & Lc > −A·c`` (all False without dual clip, as in the
reference), ``tis_capped = log_w > log C`` (all False without TIS). Unused inputs (``ref`` when ``KL_MODE == 0``,
``tis_in`` when ``TIS_MODE == 0``, ``is_w`` without ``HAS_IS_W``) are never read: pass any tensor of the block's
shape.

Conventions:

* Masking: every output is 0 / False where ``m`` is False — *selected* (``where``), never multiplied, so
  NaN/inf outside the mask cannot leak, as in the reference.
* Derivatives follow torch autograd of the reference formulas evaluated in fp32, ties included: ``clamp`` passes
  the gradient on its closed interval (so the log-ratio clamp kills it only strictly outside ±20, and ``clip(ρ)``
  passes it for ``1−ε_low ≤ ρ ≤ 1+ε_high``); ``maximum``/``minimum`` split it half/half where the two sides are
  equal (inside the clip range ``−Aρ == −A·clip(ρ)``, so both halves add to the full gradient); in the dual clip
  the constant side ``−A·c`` takes no gradient, so a tie keeps half; k3's derivative
  ``d/dlogp (eˣ − x − 1) = (eˣ − 1)·dx/dlogp = 1 − eˣ`` is zero where either clamp is active; ``abs`` has
  derivative ``sign`` (0 at 0). The TIS weight is detached (a constant for the gradient).
* Precision: fp32 in, fp32 out; the operation order is the one both kernels used before this helper existed, so
  their results are unchanged bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def policy_token_terms(
    logp, old, adv, m, ref, tis_in, is_w, clip_low, clip_high, clip_c, log_cap, kl_coef,
    DUAL_CLIP: tl.constexpr, KL_MODE: tl.constexpr, KL_ST: tl.constexpr, KL_IN_LOSS: tl.constexpr,
    TIS_MODE: tl.constexpr, HAS_IS_W: tl.constexpr, RATIO_CLAMP: tl.constexpr, K3_X_CLAMP: tl.constexpr,
    K3_Y_CLAMP: tl.constexpr,
):
    """Per-token terms of docs/DESIGN.md §4 for a block of tokens (any shape), fp32, masked by ``m``; see the module
    docstring for the formulas, the outputs and the tie conventions."""
    # ratio = exp(clamp(logp − old, ±20)); the clamp passes the gradient on its closed interval only.
    d = logp - old
    dc = tl.minimum(tl.maximum(d, -RATIO_CLAMP), RATIO_CLAMP)
    ratio = tl.exp(dc)
    dratio = tl.where((d >= -RATIO_CLAMP) & (d <= RATIO_CLAMP), ratio, 0.0)

    # Clipped surrogate Lc = max(−Aρ, −A·clip(ρ)); autograd's max splits ties, clip passes inside [lo, hi].
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, clip_low), clip_high)
    lc = tl.maximum(pg1, pg2)
    share1 = tl.where(pg1 > pg2, 1.0, tl.where(pg1 == pg2, 0.5, 0.0))
    inside = (ratio >= clip_low) & (ratio <= clip_high)
    dlc = -adv * dratio * (share1 + tl.where(inside, 1.0 - share1, 0.0))
    clipped = pg2 > pg1
    never = m != m  # all-False of the block's shape (m is boolean: never NaN)
    if DUAL_CLIP:
        # For A < 0: min(Lc, −A·c); the constant side takes no gradient, a tie keeps half.
        pg3 = -adv * clip_c
        neg = adv < 0
        pg = tl.where(neg, tl.minimum(pg3, lc), lc)
        keep = tl.where(lc < pg3, 1.0, tl.where(lc == pg3, 0.5, 0.0))
        dpg = tl.where(neg, dlc * keep, dlc)
        clipped_lower = neg & (lc > pg3)
    else:
        pg = lc
        dpg = dlc
        clipped_lower = never

    tis_capped = never
    if TIS_MODE != 0:
        if TIS_MODE == 1:
            log_w = tl.where(m, old - tis_in, 0.0)
        else:
            log_w = tis_in
        tis_capped = log_w > log_cap
        # min(exp(Δ), C) as exp(min(Δ, log C)): no overflow; the weight is a constant for the gradient.
        w = tl.exp(tl.minimum(log_w, log_cap))
        pg = pg * w
        dpg = dpg * w
    if HAS_IS_W:
        pg = pg * is_w
        dpg = dpg * is_w

    dl = dpg
    kl = tl.zeros_like(logp)
    if KL_MODE != 0:
        diff = logp - ref
        if KL_MODE == 1:
            kl = diff
            dkl = tl.zeros_like(diff) + 1.0
        elif KL_MODE == 2:
            kl = 0.5 * diff * diff
            dkl = diff
        elif KL_MODE == 3:
            nx = -diff
            x = tl.minimum(tl.maximum(nx, -K3_X_CLAMP), K3_X_CLAMP)
            ex = tl.exp(x)
            e = ex - x - 1.0
            kl = tl.minimum(tl.maximum(e, -K3_Y_CLAMP), K3_Y_CLAMP)
            # d/dlogp (eˣ − x − 1) = (eˣ − 1)·dx/dlogp = 1 − eˣ, zero where either clamp is active.
            live = (nx >= -K3_X_CLAMP) & (nx <= K3_X_CLAMP) & (e >= -K3_Y_CLAMP) & (e <= K3_Y_CLAMP)
            dkl = tl.where(live, 1.0 - ex, 0.0)
        else:
            kl = tl.abs(diff)
            dkl = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        if KL_ST:
            dkl = diff  # straight-through: the gradient of k2 = ½·diff²
        if KL_IN_LOSS:
            dl = dl + kl_coef * dkl

    # Select, never multiply: masked tokens give exact zeros even when their inputs are NaN or inf.
    return (
        tl.where(m, pg, 0.0), tl.where(m, kl, 0.0), tl.where(m, dl, 0.0), tl.where(m, -dc, 0.0),
        m & clipped, m & clipped_lower, m & tis_capped,
    )  # fmt: skip


@triton.jit
def store_partial_sums(
    row_ptr, coef_ptr, coef_stride, idx, in_bounds, weight_ptr, m, pg, kl, ent, nlr, clipped, clipped_lower,
    tis_capped, NUM_PARTS: tl.constexpr, STORE_KL: tl.constexpr, STORE_ENT: tl.constexpr, STORE_TIS: tl.constexpr,
):
    """Store one program's partial sums at ``row_ptr`` in the column layout of ``_loss_plan`` — per part ``p``,
    ``Σ c_p·pg``, ``Σ c_p·kl``, ``Σ c_p·H`` at ``3p + COL_PG/KL/ENT``; then at ``3P + COL_*`` the token count and
    the clipped, clipped-lower, ``neg_log_ratio`` and TIS-capped sums — and return ``c_total = Σ_p weight_p·c_p``.

    ``c_p`` is row ``p`` of the coefficients (``coef_ptr + p·coef_stride + idx``, masked by ``in_bounds``),
    ``weight_p`` at ``weight_ptr + p``. Columns whose ``STORE_*`` is off are not written (the caller's buffer
    holds zeros there, or they are never read)."""
    c_total = tl.zeros_like(pg)
    for p in tl.static_range(NUM_PARTS):
        c = tl.load(coef_ptr + p * coef_stride + idx, mask=in_bounds, other=0.0)
        c_total += tl.load(weight_ptr + p) * c
        tl.store(row_ptr + 3 * p, tl.sum(c * pg, axis=0))
        if STORE_KL:
            tl.store(row_ptr + 3 * p + 1, tl.sum(c * kl, axis=0))
        if STORE_ENT:
            tl.store(row_ptr + 3 * p + 2, tl.sum(c * ent, axis=0))
    met = row_ptr + 3 * NUM_PARTS
    tl.store(met + 0, tl.sum(tl.where(m, 1.0, 0.0), axis=0))
    tl.store(met + 1, tl.sum(tl.where(clipped, 1.0, 0.0), axis=0))
    tl.store(met + 2, tl.sum(tl.where(clipped_lower, 1.0, 0.0), axis=0))
    tl.store(met + 3, tl.sum(nlr, axis=0))
    if STORE_TIS:
        tl.store(met + 4, tl.sum(tl.where(tis_capped, 1.0, 0.0), axis=0))
    return c_total
