"""Naive torch reference for ``linear_logprob``: full ``[T, V]`` logits, then log-softmax and gather.

Used by the tests in float64 (ground truth) and by the benchmark in fp32 (the baseline every chunked path is
compared with). It materialises ``T × V`` on purpose; never use it on large shapes.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def linear_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probability (and entropy) computed the obvious way, in the inputs' dtype.

    Args:
        hidden: ``[T, H]`` floating.  weight: ``[V, H]``, same dtype.
        targets: ``[T]`` integer, in ``[0, V)`` or ``-100`` (ignored: logp 0, no gradient through logp).
        temperature: logits are divided by it before the log-softmax.
        return_entropy: also return ``H = -Σ_v p_v log p_v`` of ``softmax(z / temperature)`` (every row,
            ignored ones included).
    Returns:
        ``logp [T]`` (and ``entropy [T]``), in the inputs' dtype, differentiable by autograd.
    """
    logits = (hidden @ weight.t()) / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    valid = targets != IGNORE_INDEX
    picked = logprobs.gather(1, targets.clamp(min=0).long().unsqueeze(1)).squeeze(1)
    logp = torch.where(valid, picked, torch.zeros_like(picked))
    if not return_entropy:
        return logp
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    return logp, entropy
