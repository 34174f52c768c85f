"""cipo inside verl 0.9.1: the ``cipo`` policy loss and the ``cipo`` fused log-prob backend.

Importing this module (idempotent) does two things and nothing else:

1. registers the policy loss ``"cipo"`` in verl's ``POLICY_LOSS_REGISTRY``
   (``actor_rollout_ref.actor.policy_loss.loss_mode=cipo``): verl's ``vanilla`` PPO loss (clip-higher, dual-clip,
   ``rollout_is_weights``, the five ``loss_agg_mode`` values with ``config.global_batch_info``) computed by
   :func:`cipo.policy_loss`;
2. teaches verl's fused-kernel path a backend ``"cipo"``
   (``actor_rollout_ref.model.use_fused_kernels=True`` with ``actor_rollout_ref.model.fused_kernel_options.
   impl_backend=cipo``): ``FusedLinearForPPO`` (hidden states, LM-head weight, labels, temperature → per-token
   log-probs and entropy) is computed by :func:`cipo.linear_logprob`, which never materialises the logits.
   verl's own backends (``torch``, ``liger``, ``triton``) keep their code paths: the two patched callables
   hand every other backend name to verl's originals unchanged.

verl loads it by itself in every process that imports verl, through the ``verl.plugins`` entry point that
cipo's package declares (verl 0.9.1 loads that group in ``verl/__init__.py`` unless
``VERL_USE_EXTERNAL_PLUGINS=none``), or when named in ``VERL_USE_EXTERNAL_MODULES=cipo.integrations.verl`` or
``actor_rollout_ref.model.external_lib=cipo.integrations.verl``. Semantics, mapping tables and what is not covered:
docs/integrations/verl.md.
"""

from __future__ import annotations

import logging
import numbers
from typing import Any, Optional

import torch

try:
    from verl.models.transformers import monkey_patch as _verl_monkey_patch
    from verl.trainer.ppo import core_algos as _verl_core_algos
    from verl.utils.experimental import torch_functional as _verl_torch_functional
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError(
        "cipo.integrations.verl needs verl 0.9.1 (pip install 'cipo[verl]'; it cannot share an environment with "
        f"TRL 1.16 or math-verify): {exc}"
    ) from exc

logger = logging.getLogger(__name__)

LOSS_NAME = "cipo"
"""Name under which the policy loss is registered (``actor.policy_loss.loss_mode``)."""

BACKEND_NAME = "cipo"
"""Value of ``model.fused_kernel_options.impl_backend`` that routes the fused log-probs to cipo."""

SUPPORTED_VERL_VERSION = "0.9.1"

# Keys verl 0.9.1's ppo_loss writes into ActorConfig.global_batch_info, i.e. agg_loss's keyword arguments.
_GLOBAL_BATCH_KEYS = frozenset({"dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor"})

# Marker attribute on every callable this module installs (idempotence, and refusing a foreign "cipo").
_MARK = "_cipo_integration"


# ------------------------------------------------------------------------------------------------ policy loss


def _config_value(config: Any, name: str, default: Any = None) -> Any:
    """``config.name`` for verl's ActorConfig (a BaseConfig) or an omegaconf DictConfig, else ``default``."""
    getter = getattr(config, "get", None)
    if callable(getter):
        return getter(name, default)
    return getattr(config, name, default)


def policy_loss_config(config: Any, loss_agg_mode: str) -> Any:
    """The :class:`cipo.PolicyLossConfig` equivalent to verl's ``vanilla`` loss under an actor ``config``.

    Mapping (verl 0.9.1 ``compute_policy_loss_vanilla``): ``clip_ratio_low``/``clip_ratio_high`` fall back to
    ``clip_ratio`` when None; ``clip_ratio_c`` (default 3.0; verl's dual-clip is always on, so it must be > 1);
    ``loss_agg_mode`` is the argument verl passes, not ``config.loss_agg_mode``; ``loss_scale_factor`` comes from
    ``config.global_batch_info`` (verl's vanilla reads it only there). KL, entropy and truncated IS are off: verl's
    ``ppo_loss`` adds ``kl_loss`` and the entropy term itself, and hands precomputed ``rollout_is_weights``.
    """
    from cipo.config import LOSS_AGG_MODES, PolicyLossConfig

    if config is None:
        raise ValueError("the 'cipo' policy loss needs verl's actor config (ActorConfig); got config=None")
    if type(config).__name__ == "AlgoConfig":
        raise ValueError("the 'cipo' policy loss got verl's AlgoConfig; it needs the actor config (ActorConfig)")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"the 'cipo' policy loss has no loss_agg_mode {loss_agg_mode!r}; "
                         f"supported: {list(LOSS_AGG_MODES)}")
    clip_ratio = _config_value(config, "clip_ratio", 0.2)
    low = _config_value(config, "clip_ratio_low", None)
    high = _config_value(config, "clip_ratio_high", None)
    clip_ratio_c = _config_value(config, "clip_ratio_c", 3.0)
    if clip_ratio_c is None:
        raise ValueError("actor.clip_ratio_c=None: verl's vanilla loss always applies dual-clip; set a value > 1")
    info = _global_batch_info(config)
    return PolicyLossConfig(
        clip_ratio_low=float(clip_ratio if low is None else low),
        clip_ratio_high=float(clip_ratio if high is None else high),
        clip_ratio_c=float(clip_ratio_c),
        loss_agg_mode=loss_agg_mode,
        loss_scale_factor=None if info.get("loss_scale_factor") is None else float(info["loss_scale_factor"]),
    )


def _global_batch_info(config: Any) -> dict[str, Any]:
    info = _config_value(config, "global_batch_info", None)
    if info is None:
        return {}
    info = dict(info)
    unknown = sorted(set(info) - _GLOBAL_BATCH_KEYS)
    if unknown:
        raise ValueError(f"config.global_batch_info has key(s) {unknown} that the 'cipo' policy loss does not map "
                         f"(known: {sorted(_GLOBAL_BATCH_KEYS)}); this integration targets verl "
                         f"{SUPPORTED_VERL_VERSION}")
    return info


def _as_number(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def _normalizer_and_scale(loss_agg_mode: str, info: dict[str, Any]) -> tuple[Optional[float], int]:
    """(cipo's ``loss_normalizer``, the factor applied afterwards) reproducing verl's ``agg_loss`` arguments.

    verl: token-mean ``Σ/batch_num_tokens·dp``, token-sum ``Σ·dp``, seq-mean-* ``Σ_seq/global_batch_size·dp``
    (then ``/loss_scale_factor`` for -norm). Without the global count verl uses the local one, which is an
    error when dp_size > 1.
    """
    dp_size = _as_number(info.get("dp_size", 1))
    if isinstance(dp_size, bool) or not isinstance(dp_size, numbers.Integral) or dp_size < 1:
        raise ValueError(f"config.global_batch_info['dp_size'] must be an int >= 1; got {dp_size!r}")
    if loss_agg_mode == "token-sum":
        return None, int(dp_size)
    key = "batch_num_tokens" if loss_agg_mode == "token-mean" else "global_batch_size"
    count = _as_number(info.get(key))
    if count is None:
        if dp_size > 1:
            raise ValueError(f"config.global_batch_info[{key!r}] is required when dp_size > 1 "
                             f"(loss_agg_mode={loss_agg_mode!r})")
        return None, int(dp_size)
    return count, int(dp_size)


def compute_policy_loss_cipo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's policy-loss contract, computed by :func:`cipo.policy_loss` (registered as ``"cipo"``).

    Args:
        old_log_prob, log_prob, advantages, response_mask: ``[B, L]`` (verl's padded layout).
        loss_agg_mode: one of verl's five modes.
        config: verl's ActorConfig; ``global_batch_info`` (dp_size, batch_num_tokens, global_batch_size,
            loss_scale_factor) as verl's ``ppo_loss`` fills it.
        rollout_is_weights: ``[B, L]`` importance weights from verl's rollout correction, or None.

    Returns:
        ``(pg_loss, metrics)`` with metrics ``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``.
    """
    import cipo

    cfg = policy_loss_config(config, loss_agg_mode)
    if log_prob.dim() != 2:
        raise ValueError(f"the 'cipo' policy loss expects verl's padded [B, L] tensors; got log_prob of shape "
                         f"{tuple(log_prob.shape)}")
    normalizer, dp_size = _normalizer_and_scale(loss_agg_mode, _global_batch_info(config))
    loss, metrics = cipo.policy_loss(
        log_prob, old_log_prob, advantages, response_mask.bool(), cfg,
        loss_normalizer=normalizer, is_weights=rollout_is_weights,
    )
    if dp_size != 1:
        loss = loss * dp_size
    return loss, {
        "actor/pg_clipfrac": metrics["clipfrac"],
        "actor/ppo_kl": metrics["approx_kl"],
        "actor/pg_clipfrac_lower": metrics["clipfrac_lower"],
    }


setattr(compute_policy_loss_cipo, _MARK, True)


# ----------------------------------------------------------------------------------------- fused log-probs


def fused_linear_for_ppo(hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``FusedLinearForPPO`` contract by :func:`cipo.linear_logprob`.

    ``hidden_states`` ``[T, H]`` or ``[B, T, H]``, ``vocab_weights`` ``[V, H]``, ``input_ids`` (the rolled labels)
    of the leading shape → ``(log_probs, entropy)`` of the leading shape: log-probs in float32, entropy in the
    hidden states' dtype, as verl's torch backend returns them. Labels of -100 give log-prob 0 (verl's torch
    backend would fail on them).
    """
    import cipo

    if hidden_states.dim() not in (2, 3):
        raise ValueError(f"hidden_states must be [T, H] or [B, T, H]; got shape {tuple(hidden_states.shape)}")
    lead = hidden_states.shape[:-1]
    if tuple(input_ids.shape) != tuple(lead):
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)} must match hidden_states shape "
                         f"{tuple(lead)}")
    log_probs, entropy = cipo.linear_logprob(
        hidden_states.reshape(-1, hidden_states.shape[-1]), vocab_weights, input_ids.reshape(-1),
        temperature=float(temperature), return_entropy=True,
    )
    return log_probs.to(torch.float32).reshape(lead), entropy.to(hidden_states.dtype).reshape(lead)


def _wrap_fused_linear_for_ppo(cls: type) -> None:
    """Let ``FusedLinearForPPO(impl_backend="cipo")`` exist and run :func:`fused_linear_for_ppo`."""
    if getattr(cls.__init__, _MARK, False):
        return
    original_init, original_forward = cls.__init__, cls.forward

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        if impl_backend == BACKEND_NAME:
            original_init(self, chunk_size=chunk_size, impl_backend="torch")
            self.impl_backend = BACKEND_NAME
        else:
            original_init(self, chunk_size=chunk_size, impl_backend=impl_backend)

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        if self.impl_backend == BACKEND_NAME:
            return fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature)
        return original_forward(self, hidden_states, vocab_weights, input_ids, temperature)

    for new, old in ((__init__, original_init), (forward, original_forward)):
        new.__wrapped__ = old
        new.__doc__ = old.__doc__
        new.__qualname__ = old.__qualname__
        setattr(new, _MARK, True)
    cls.__init__, cls.forward = __init__, forward


def _wrap_patch_forward_with_backends(module: Any) -> None:
    """Let verl's ``patch_forward_with_backends`` accept ``fused_kernels_backend="cipo"``.

    verl 0.9.1 skips the patch (with a print) for any backend outside triton/torch/liger. For ``cipo`` it installs
    verl's torch-backend forward (which builds ``FusedLinearForPPO`` from ``model._verl_fused_kernels_backend``)
    and marks the model ``cipo``; every other value goes to verl's function untouched.
    """
    original = module.patch_forward_with_backends
    if getattr(original, _MARK, False):
        return

    def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str = None):
        if use_fused_kernels and fused_kernels_backend == BACKEND_NAME:
            original(model, use_fused_kernels=True, fused_kernels_backend="torch")
            model._verl_fused_kernels_backend = BACKEND_NAME
            print(f"Using cipo backend (cipo.linear_logprob) for fused kernels in {model.__class__.__name__}")
            return None
        return original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)

    patch_forward_with_backends.__wrapped__ = original
    patch_forward_with_backends.__doc__ = original.__doc__
    setattr(patch_forward_with_backends, _MARK, True)
    module.patch_forward_with_backends = patch_forward_with_backends


# ------------------------------------------------------------------------------------------------- install


def _check_version() -> None:
    import verl

    version = getattr(verl, "__version__", None)
    if version != SUPPORTED_VERL_VERSION:
        logger.warning("cipo.integrations.verl is written and tested for verl %s; this is verl %s",
                       SUPPORTED_VERL_VERSION, version)


def install() -> None:
    """Register the ``cipo`` policy loss and the ``cipo`` fused backend in verl. Safe to call any number of times.

    Raises:
        RuntimeError: when another object is already registered under the policy-loss name ``"cipo"``.
    """
    registry = _verl_core_algos.POLICY_LOSS_REGISTRY
    present = registry.get(LOSS_NAME)
    if present is not None and not getattr(present, _MARK, False):
        raise RuntimeError(f"verl already has a policy loss named {LOSS_NAME!r} ({present!r}) that is not cipo's")
    _verl_core_algos.register_policy_loss(LOSS_NAME)(compute_policy_loss_cipo)
    _wrap_fused_linear_for_ppo(_verl_torch_functional.FusedLinearForPPO)
    _wrap_patch_forward_with_backends(_verl_monkey_patch)


try:
    _check_version()
    install()
except Exception:
    # verl swallows plugin import errors at DEBUG level; say it where users look.
    logger.warning("cipo.integrations.verl failed to install into verl", exc_info=True)
    raise
