"""Group-wise advantages of sequence rewards: ``cipo.group_advantages``."""

from __future__ import annotations

import math

import torch

from .kernels._dispatch import use_triton
from .kernels.group_advantage_torch import ESTIMATORS, group_advantages_torch


def dense_group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary integer group ids ``[S]`` to dense numbers ``[S]`` in ``[0, G)``; returns them and G."""
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse.long(), unique.numel()


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, estimator: str = "grpo",
                     eps: float = 1e-6) -> torch.Tensor:
    """Per-sequence advantages, normalised within each group of sequences sharing a group id.

    Args:
        rewards: ``[S]`` sequence rewards (any real dtype; integers and bools are taken as floats).
        group_ids: ``[S]`` integer group id of each sequence (any values; need not be contiguous).
        estimator: ``"grpo"`` ``(r − mean) / (std + eps)``, ``"drgrpo"`` ``r − mean`` or ``"rloo"``
            ``G/(G−1) · (r − mean)``; see docs/DESIGN.md §4 for groups of one and groups of equal rewards.
        eps: added to the group's unbiased std (``grpo``). ≥ 0.

    Returns:
        ``[S]`` float32 advantages (float64 when ``rewards`` is float64, for reference checks).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite float >= 0; got {eps!r}")
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [S]; got {_describe(rewards)}")
    if not isinstance(group_ids, torch.Tensor) or group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids must be a tensor of the same shape as rewards {tuple(rewards.shape)}; "
                         f"got {_describe(group_ids)}")
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must hold integers; got dtype {group_ids.dtype}")
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    rewards = rewards.to(out_dtype)
    if rewards.numel() == 0:
        return rewards.clone()
    if not bool(torch.isfinite(rewards).all()):
        row = int(torch.nonzero(~torch.isfinite(rewards))[0])
        raise ValueError(f"rewards[{row}] is not finite ({float(rewards[row])})")
    group_index, num_groups = dense_group_index(group_ids)
    if use_triton(rewards) and out_dtype == torch.float32:
        from .kernels.group_advantage import group_advantages_triton

        return group_advantages_triton(rewards, group_index, num_groups, estimator, eps)
    return group_advantages_torch(rewards, group_index, num_groups, estimator, eps)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)} dtype {value.dtype}"
    return type(value).__name__
