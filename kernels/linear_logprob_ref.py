"""The materialised reference of ``linear_logprob``: full ``[T, V]`` logits, then log-softmax and gather.

:func:`linear_logprob_reference` is the tests' float64 ground truth, the log-prob half of the fused loss's
end-to-end reference (``cipo.fused_loss_ref``: the naive benchmark row and the trainer's unfused path). It
materialises ``T × V`` on purpose; never use it on large shapes. It is a reference only: the kernels' dispatch
never imports it (the CPU path is :mod:`.linear_logprob_torch`).
"""

from __future__ import annotations

import torch

from .linear_logprob_torch import IGNORE_INDEX


def linear_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    logits_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probability (and entropy) computed the obvious way: ``[T, V]`` logits, log-softmax, gather.

    The one materialised path of the project: the tests' float64 ground truth, the benchmarks' naive row and an
    unfused trainer's log-probs (fp32 logits: pass fp32 ``hidden``/``weight`` or ``logits_dtype=torch.float32``).

    Args:
        hidden: ``[T, H]`` floating.  weight: ``[V, H]``, same dtype.
        targets: ``[T]`` integer, in ``[0, V)`` or ``-100`` (ignored: logp 0, no gradient through logp).
        temperature: logits are divided by it before the log-softmax.
        return_entropy: also return ``H = -Σ_v p_v log p_v`` of ``softmax(z / temperature)`` (every row,
            ignored ones included).
        logits_dtype: cast the logits to this dtype after the matmul (verl's default for half inputs: the GEMM in
            the input dtype, the softmax in fp32); None keeps the inputs' dtype.
    Returns:
        ``logp [T]`` (and ``entropy [T]``), in the logits' dtype, differentiable by autograd.
    """
    logits = hidden @ weight.t()
    if logits_dtype is not None:
        logits = logits.to(logits_dtype)
    logits = logits / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    valid = targets != IGNORE_INDEX
    picked = logprobs.gather(1, targets.clamp(min=0).long().unsqueeze(1)).squeeze(1)
    logp = torch.where(valid, picked, torch.zeros_like(picked))
    if not return_entropy:
        return logp
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    return logp, entropy
