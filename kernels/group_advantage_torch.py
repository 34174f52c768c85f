"""The torch path of the group-wise advantage: what ``cipo.group_advantages`` runs on CPU tensors and in float64 (the
Triton kernel's float64 oracle in the tests; the formulas are checked against ``tests/core/loop_reference.py``).

docs/DESIGN.md §4 (verl's ``compute_grpo_outcome_advantage`` / ``compute_rloo_outcome_advantage``):

* grpo:   ``A_i = (r_i − mean_g) / (std_g + eps)``, std unbiased (N−1).
* drgrpo: ``A_i = r_i − mean_g``.
* rloo:   ``A_i = G/(G−1) · (r_i − mean_g)``.

A group of one sequence uses mean 0 and std 1 (verl's convention): grpo gives ``r / (1 + eps)``, drgrpo and
rloo give ``r``. A group whose rewards are all equal gives exactly 0 — enforced, not left to rounding, since
``mean`` of equal floats need not equal them bit for bit.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("grpo", "drgrpo", "rloo")


def group_advantages_torch(rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int,
                           estimator: str, eps: float) -> torch.Tensor:
    """Advantages of ``rewards`` grouped by ``group_index``.

    Args:
        rewards: ``[S]`` floating; computed in float64, returned in ``rewards.dtype``.
        group_index: ``[S]`` int64 in ``[0, num_groups)`` — dense group numbers.
        num_groups: number of groups G (every group has at least one member).
        estimator: one of :data:`ESTIMATORS`.
        eps: added to the std (grpo only).

    Returns:
        ``[S]`` advantages, dtype of ``rewards``.
    """
    r = rewards.double()
    count = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, group_index,
                                                                                    torch.ones_like(r))
    total = torch.zeros_like(count).index_add_(0, group_index, r)
    mean = torch.where(count > 1, total / count, torch.zeros_like(total))
    centred = r - mean[group_index]
    n = count[group_index]
    if estimator == "grpo":
        sq = torch.zeros_like(count).index_add_(0, group_index, (r - (total / count)[group_index]) ** 2)
        std = torch.where(count > 1, torch.sqrt(sq / (count - 1).clamp(min=1)), torch.ones_like(sq))
        adv = centred / (std[group_index] + eps)
    elif estimator == "drgrpo":
        adv = centred
    elif estimator == "rloo":
        adv = torch.where(n > 1, centred * n / (n - 1).clamp(min=1), r)
    else:
        raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}")
    big = torch.finfo(torch.float64).max
    gmax = torch.full_like(count, -big).scatter_reduce(0, group_index, r, "amax")
    gmin = torch.full_like(count, big).scatter_reduce(0, group_index, r, "amin")
    all_equal = (gmax == gmin) & (count > 1)
    adv = torch.where(all_equal[group_index], torch.zeros_like(adv), adv)
    return adv.to(rewards.dtype)
