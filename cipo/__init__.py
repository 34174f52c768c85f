"""cipo — Correction-Oriented Policy Optimization for RL with verifiable rewards.

Public API (stable names):

* :class:`PolicyLossConfig` — the loss knobs (verl names and defaults).
* :func:`group_advantages` — GRPO / Dr.GRPO / RLOO advantages within groups.
* :func:`policy_loss` — the clipped policy loss from per-token log-probs, padded or packed.
* :class:`PackedBatch`, :class:`SequenceSample` — the packed base + correction layout.
* :func:`cipo_policy_loss` — ``L_base + λ · L_corr`` on a packed batch.
* :class:`CIPOConfig` — the CIPO algorithm's knobs (correction stream, replay, shaping, selection).
"""

from .advantages import group_advantages
from .algorithm import CIPOConfig
from .config import PolicyLossConfig
from .loss import cipo_policy_loss, policy_loss
from .packing import BASE_STREAM, CORRECTION_STREAM, IGNORE_INDEX, PackedBatch, SequenceSample

__version__ = "0.1.0"

__all__ = [
    "BASE_STREAM",
    "CIPOConfig",
    "CORRECTION_STREAM",
    "IGNORE_INDEX",
    "PackedBatch",
    "PolicyLossConfig",
    "SequenceSample",
    "cipo_policy_loss",
    "group_advantages",
    "policy_loss",
]
