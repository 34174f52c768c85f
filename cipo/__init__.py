"""cipo — Correction-Oriented Policy Optimization for RL with verifiable rewards.

Public API (stable names):

* :class:`PolicyLossConfig` — the loss knobs (verl names and defaults).
* :func:`group_advantages` — GRPO / Dr.GRPO / RLOO advantages within groups.
* :func:`policy_loss` — the clipped policy loss from per-token log-probs, padded or packed.
* :class:`PackedBatch`, :class:`SequenceSample` — the packed base + correction layout.
* :func:`cipo_policy_loss` — ``L_base + λ · L_corr`` on a packed batch.
* :class:`CIPOConfig` — the CIPO algorithm's knobs (correction stream, replay, shaping, selection).
* :func:`linear_logprob` — per-token log-prob (and entropy) from hidden states, never materialising the logits.
* :func:`fused_linear_policy_loss` — hidden states + LM head + packed batch → loss, gradient finished in the
  forward, chunk by chunk.
"""

from .advantages import group_advantages
from .algorithm import CIPOConfig
from .config import PolicyLossConfig
from .loss import cipo_policy_loss, policy_loss
from .packing import BASE_STREAM, CORRECTION_STREAM, IGNORE_INDEX, PackedBatch, SequenceSample

__version__ = "0.1.0"

# The kernels import triton when they load; keep `import cipo` light and let the interpreter flag
# (TRITON_INTERPRET=1) be set by callers before the first use.
_LAZY = {
    "linear_logprob": "cipo.kernels.linear_logprob",
    "fused_linear_policy_loss": "cipo.kernels.fused_linear_policy_loss",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cipo' has no attribute {name!r}")


__all__ = [
    "BASE_STREAM",
    "CIPOConfig",
    "CORRECTION_STREAM",
    "IGNORE_INDEX",
    "PackedBatch",
    "PolicyLossConfig",
    "SequenceSample",
    "cipo_policy_loss",
    "fused_linear_policy_loss",
    "group_advantages",
    "linear_logprob",
    "policy_loss",
]
