"""Triton fast path of :func:`cipo.group_advantages`: segmented mean / std of sequence rewards per group.

Formulas are docs/DESIGN.md §4, exactly as :mod:`.group_advantage_torch` states them (grpo, drgrpo, rloo; a group of one
uses mean 0 and std 1; a group of equal rewards gives exactly 0).

Layout of the computation (deterministic: no atomics, every reduction has a fixed order):

* torch: a stable ``argsort`` of the dense group index gives the members of each group as one contiguous run
  of ``order``; ``bincount`` gives the group sizes and their exclusive prefix sum the run offsets.
* Triton: one program per group walks its run in blocks of ``BLOCK`` (gathering ``rewards[order[i]]``),
  in up to three passes — sum and min/max, sum of squared deviations (grpo only), then the scattered write
  ``out[order[i]] = A``. With ``BLOCK`` = the next power of two of the largest group (capped at
  :data:`MAX_BLOCK`) every pass is a single block for the usual group sizes.

Accuracy (fp32 in, fp32 compute, fp32 out): every value is first shifted by the group's first reward
(``d = r − r₀``), so the mean and the two-pass variance are computed on deviations, whose rounding errors are
relative to the group's *spread*, not to the magnitude of the rewards (rewards ≈ 1000 ± 0.01 stay accurate).
The error against the float64 reference is then a few units of fp32 rounding (u = 2⁻²⁴) times
``log2(n)·max|d| / (std + eps)`` plus the rounding of the result; the tests use rtol 1e-5 / atol 1e-6.
The shift also makes an all-equal group's deviations exactly 0; the explicit all-equal rule (max == min → 0)
is kept anyway, and its division by ``std + eps`` is replaced by 1 so that ``eps = 0`` stays finite.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .group_advantage_torch import ESTIMATORS

MAX_BLOCK = 1024
"""Largest block of group members a program holds at once; bigger groups loop."""

_ESTIMATOR_CODE = {"grpo": 0, "drgrpo": 1, "rloo": 2}


@triton.jit
def _group_advantage_kernel(rewards_ptr, order_ptr, offsets_ptr, counts_ptr, out_ptr, eps,
                            ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr):
    """One program per group ``g``: members are ``order[offsets[g] : offsets[g] + counts[g]]``."""
    g = tl.program_id(0)
    start = tl.load(offsets_ptr + g)
    n = tl.load(counts_ptr + g)
    cols = tl.arange(0, BLOCK)
    # Shift by the first member: deviations carry the spread without the magnitude (see module docstring).
    pivot = tl.load(rewards_ptr + tl.load(order_ptr + start)).to(tl.float32)

    # Pass 1: sum of deviations, min and max (for the all-equal rule).
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    hi = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    lo = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    for k in range(0, n, BLOCK):
        pos = k + cols
        valid = pos < n
        idx = tl.load(order_ptr + start + pos, mask=valid, other=0)
        r = tl.load(rewards_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        acc += tl.where(valid, r - pivot, 0.0)
        hi = tl.maximum(hi, tl.where(valid, r, float("-inf")))
        lo = tl.minimum(lo, tl.where(valid, r, float("inf")))
    nf = n.to(tl.float32)
    multi = n > 1
    mean_d = tl.sum(acc, axis=0) / nf
    all_equal = (tl.max(hi, axis=0) == tl.min(lo, axis=0)) & multi

    # Pass 2 (grpo): unbiased std from squared deviations about the mean — two-pass, no cancellation.
    std = 1.0
    if ESTIMATOR == 0:
        sq = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, n, BLOCK):
            pos = k + cols
            valid = pos < n
            idx = tl.load(order_ptr + start + pos, mask=valid, other=0)
            r = tl.load(rewards_ptr + idx, mask=valid, other=0.0).to(tl.float32)
            dev = tl.where(valid, (r - pivot) - mean_d, 0.0)
            sq += dev * dev
        var = tl.sum(sq, axis=0) / tl.maximum(nf - 1.0, 1.0)
        std = tl.where(multi, tl.sqrt(var), 1.0)

    # Pass 3: write A to the members' original positions.
    for k in range(0, n, BLOCK):
        pos = k + cols
        valid = pos < n
        idx = tl.load(order_ptr + start + pos, mask=valid, other=0)
        r = tl.load(rewards_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        # A group of one has mean 0 (verl's convention): its centred reward is r itself.
        centred = tl.where(multi, (r - pivot) - mean_d, r)
        if ESTIMATOR == 0:
            # An all-equal group (std 0, and eps may be 0) is zeroed below: keep its division finite.
            adv = centred / tl.where(all_equal, 1.0, std + eps)
        elif ESTIMATOR == 1:
            adv = centred
        else:
            adv = tl.where(multi, centred * (nf / tl.maximum(nf - 1.0, 1.0)), r)
        adv = tl.where(all_equal, 0.0, adv)
        tl.store(out_ptr + idx, adv, mask=valid)


def group_advantages_triton(rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int, estimator: str,
                            eps: float) -> torch.Tensor:
    """Advantages of ``rewards`` grouped by ``group_index`` (Triton; same contract as the reference).

    Args:
        rewards: ``[S]`` float32 (other floating dtypes are loaded and computed in fp32), finite.
        group_index: ``[S]`` int64, dense group numbers in ``[0, num_groups)``.
        num_groups: G ≥ 1; every group has at least one member.
        estimator: ``grpo``, ``drgrpo`` or ``rloo``.
        eps: added to the group std (grpo).

    Returns:
        ``[S]`` float32 advantages on ``rewards.device``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}")
    num = rewards.numel()
    out = torch.empty(num, dtype=torch.float32, device=rewards.device)
    if num == 0:
        return out
    rewards = rewards.contiguous()
    group_index = group_index.to(device=rewards.device, dtype=torch.int64).contiguous()
    # Stable sort: members of a group keep their order, so the summation order is a function of the input.
    order = torch.argsort(group_index, stable=True)
    counts = torch.bincount(group_index, minlength=num_groups)
    offsets = torch.cumsum(counts, 0) - counts
    max_count = int(counts.max())  # one sync; picks the block so the usual groups need a single pass
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(max_count)))
    _group_advantage_kernel[(num_groups,)](
        rewards, order, offsets, counts, out, float(eps),
        ESTIMATOR=_ESTIMATOR_CODE[estimator], BLOCK=block, num_warps=4 if block >= 512 else 1,
    )
    return out
