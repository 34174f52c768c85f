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

__version__ = "0.1.0"

# Every public name loads on first use: `import cipo.rewards` in a reward worker process must not pay for torch
# (~2 s), and the kernels import triton, whose interpreter flag (TRITON_INTERPRET=1) callers set before first use.
_LAZY = {
    "group_advantages": "cipo.advantages",
    "CIPOConfig": "cipo.algorithm",
    "PolicyLossConfig": "cipo.config",
    "cipo_policy_loss": "cipo.loss",
    "policy_loss": "cipo.loss",
    "BASE_STREAM": "cipo.packing",
    "CORRECTION_STREAM": "cipo.packing",
    "IGNORE_INDEX": "cipo.packing",
    "PackedBatch": "cipo.packing",
    "SequenceSample": "cipo.packing",
    "linear_logprob": "cipo.kernels.linear_logprob",
    "fused_linear_policy_loss": "cipo.fused_loss",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'cipo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
