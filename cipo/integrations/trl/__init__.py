"""cipo inside TRL 1.16's ``GRPOTrainer`` (docs/integrations/trl.md).

* :class:`CipoGRPOTrainer` — ``GRPOTrainer`` whose fused LM head is :func:`cipo.linear_logprob` and, with
  ``cipo_loss=True``, whose policy loss is :func:`cipo.policy_loss` (every mappable ``loss_type``; the others refused).
* :func:`add_cipo_fused_lm_head` — the head alone, under TRL's ``fused_lm_head`` contract (no TRL import).
* :func:`trl_loss_config`, :func:`trl_loss_normalizer` — the ``GRPOConfig`` → cipo mapping (no TRL import).
* :class:`CipoCorrectionGRPOTrainer` — the CIPO correction stream on top of TRL's base stream.

Names load on first use, so importing this package needs TRL only for the trainers.
"""

from __future__ import annotations

_LAZY = {
    "CipoGRPOTrainer": "._trainer",
    "CipoCorrectionGRPOTrainer": ".correction",
    "add_cipo_fused_lm_head": "._head",
    "CipoFusedCausalLMOutput": "._head",
    "trl_loss_config": "._loss",
    "trl_loss_normalizer": "._loss",
    "LOSS_AGG_MODES": "._loss",
    "REFUSED_LOSS_TYPES": "._loss",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
