"""The end-to-end reference of the fused loss: ``[T, V]`` logits → log-softmax → gather → ``cipo_policy_loss``.

:func:`materialized_policy_loss` computes what :func:`cipo.fused_linear_policy_loss` computes, the obvious way,
with autograd for the gradients. It is assembled here once, for its three users:

* the tests hold the fused loss (both tilings, the Triton and the torch epilogues) to it in float64, and compare
  bf16 results with torch's own bf16 path (``logits_dtype=torch.float32``);
* the ``naive`` row of the loss benchmark (``bench/loss_methods.py``) times it (verl's default: the GEMM in the input
  dtype, the softmax in fp32);
* the trainer's unfused path (``actor.fused_loss: false``, ``cipo.trainer.backend.materialized_policy_loss``) runs
  it on fp32 copies of the hidden states and the head weight.

It holds the full logits and, under autograd, their gradient: never use it where memory matters. It is a reference,
not a code path of the loss: ``cipo.loss``, ``cipo.fused_loss`` and ``cipo.kernels`` never import it
(``tests/kernels/test_imports.py`` allows exactly one production importer, the trainer's unfused path, whose whole
point is to be this reference).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .config import PolicyLossConfig
from .kernels.linear_logprob_ref import linear_logprob_reference
from .loss import cipo_policy_loss
from .packing import PackedBatch

__all__ = ["MaterializedLoss", "materialized_policy_loss"]


@dataclass
class MaterializedLoss:
    """What :func:`materialized_policy_loss` returns; the tensors are in the autograd graph.

    Attributes:
        loss: 0-dim, in the logits' dtype (float32 for float32 logits, float64 for float64).
        metrics: the floats of :func:`cipo.cipo_policy_loss` (``entropy`` only with ``with_entropy``).
        logp: ``[T]`` log-probs of ``batch.targets`` (0 where the target is -100).
        entropy: ``[T]`` per-token entropy with ``with_entropy``, else None.
    """

    loss: torch.Tensor
    metrics: dict[str, float]
    logp: torch.Tensor
    entropy: Optional[torch.Tensor]


def materialized_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, batch: PackedBatch,
                             config: PolicyLossConfig, *, with_entropy: bool = False,
                             logits_dtype: Optional[torch.dtype] = None, **loss_kwargs: Any) -> MaterializedLoss:
    """CIPO's joint loss from materialised logits: ``logp`` (and the entropy) of
    ``log_softmax(hidden @ weight.T / config.temperature)`` at ``batch.targets``, then
    ``cipo_policy_loss(logp, batch, config, entropy=..., **loss_kwargs)``.

    Args:
        hidden: ``[T, H]`` floating (float64 for the tests' ground truth).  weight: ``[V, H]``, same dtype.
        batch: the packed step. ``old_logp`` None means on-policy, as in the fused loss: ``old_logp := logp``
            detached (ratio exactly 1), on a shallow copy of the batch.
        config: the loss knobs; ``config.temperature`` divides the logits.
        with_entropy: compute the per-token entropy and hand it to the loss (the ``entropy`` metric, and the
            entropy bonus when ``config.entropy_coef > 0``); the fused loss always does.
        logits_dtype: cast the logits to this dtype after the GEMM (e.g. fp32 for half inputs); None keeps the
            inputs' dtype.
        loss_kwargs: the keyword arguments of :func:`cipo.cipo_policy_loss` (``lambda_corr``, ``advantages``,
            normalisers, ...).
    """
    entropy = None
    if with_entropy:
        logp, entropy = linear_logprob_reference(hidden, weight, batch.targets, config.temperature,
                                                 return_entropy=True, logits_dtype=logits_dtype)
    else:
        logp = linear_logprob_reference(hidden, weight, batch.targets, config.temperature, logits_dtype=logits_dtype)
    if batch.old_logp is None:
        batch = copy.copy(batch)
        batch.old_logp = logp.detach()
    loss, metrics = cipo_policy_loss(logp, batch, config, entropy=entropy, **loss_kwargs)
    return MaterializedLoss(loss, metrics, logp, entropy)
