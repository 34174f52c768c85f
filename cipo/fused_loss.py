"""``cipo.fused_linear_policy_loss``: the packed-batch entry of the fused LM head + CIPO policy loss.

It validates a :class:`~cipo.packing.PackedBatch` against the hidden states and the LM-head weight, prepares the
flat token tensors (group advantages, the two stream parts, values outside the loss zeroed) and the kernels'
:class:`LossPlan` from the :class:`~cipo.config.PolicyLossConfig`, and calls the tensor-level kernel
``cipo.kernels.fused_linear_policy_loss.fused_linear_policy_loss_flat`` (how it works: that module's docstring).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .advantages import group_advantages
from .config import PolicyLossConfig
from .kernels._chunking import accum_dtype
from .kernels.fused_linear_policy_loss import fused_linear_policy_loss_flat
from .loss import StreamPart, check_finite_tensors, loss_plan
from .packing import BASE_STREAM, CORRECTION_STREAM, IGNORE_INDEX, PackedBatch

__all__ = ["fused_linear_policy_loss", "fused_loss_inputs"]


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    batch: PackedBatch,
    config: PolicyLossConfig,
    *,
    lambda_corr: float = 1.0,
    advantages: Optional[torch.Tensor] = None,
    chunk_tokens: Optional[int] = None,
    base_normalizer: Optional[float] = None,
    corr_normalizer: Optional[float] = None,
    estimator: str = "grpo",
    tiling: Optional[str] = None,
    dw_accum: str = "auto",
    check_finite: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CIPO's joint policy loss straight from the final hidden states and the LM-head weight.

    Equal to ``cipo.cipo_policy_loss(logp, batch, config, entropy=entropy, ...)`` with ``logp``/``entropy`` those
    of ``log_softmax(hidden @ weight.T / config.temperature)`` at ``batch.targets``, gradients included, without
    the ``[T, V]`` logits; the gradient w.r.t. ``hidden`` and ``weight`` is finished in the forward
    (``cipo.kernels.fused_linear_policy_loss``).

    Args:
        hidden: ``[T, H]`` final hidden states of the packed batch (fp32/bf16/fp16; fp64 for reference checks).
        weight: ``[V, H]`` LM-head weight, same dtype and device.
        batch: the packed step. ``old_logp`` None means on-policy (``old_logp := logp`` detached, ratio 1);
            ``ref_logp`` is used when given (``kl`` metric; in the loss when ``config.kl_coef > 0``), and
            ``rollout_logp`` when ``config.tis_mode`` is set.
        config: the loss knobs; ``config.temperature`` divides the logits.
        lambda_corr: λ, the weight of the correction stream, ≥ 0.
        advantages: ``[S]`` or ``[T]``; by default the group advantages of ``batch.reward`` within
            ``batch.group_id`` with ``estimator``.
        chunk_tokens: logits tile of ``chunk_tokens × V`` elements (rows per token chunk; ``chunk_tokens·V/T``
            columns per vocab slab); None: 256 MiB of fp32 logits on CUDA, 64 MiB on CPU.
        base_normalizer, corr_normalizer: each stream's global token/sequence count for micro-batches.
        estimator: ``grpo``, ``drgrpo`` or ``rloo`` (only without ``advantages``).
        tiling: ``"token"`` (6·THV; an fp32 ``V × H`` accumulator unless ``dW`` is summed in the weight dtype),
            ``"vocab"`` (8·THV, fp32 ``T × H`` accumulator) or None (automatic: token chunks when they fit the memory
            budget).
        dw_accum: the dtype of the token tiling's cross-chunk ``dW`` sum: ``"fp32"``, ``"weight"`` (no extra
            ``V × H`` buffer; the running sum is rounded to the weight dtype once per chunk, as Liger's fused
            cross-entropy does) or ``"auto"`` (default): ``"weight"`` for half weights on CUDA, else ``"fp32"``
            (``cipo.kernels.fused_linear_policy_loss.resolve_dw_accum``).
        check_finite: raise :class:`cipo.loss.NonFiniteError` naming the tensor (``hidden`` — every row: one NaN
            row, in the loss or not, makes the whole ``weight`` gradient NaN — ``weight``, or a loss token's
            ``advantages``/``old_logp``/``ref_logp``/``rollout_logp``), and when the loss is not finite. Off by
            default: it synchronises with the device.

    Returns:
        ``(loss, metrics)``: a 0-dim fp32 tensor (fp64 for fp64 inputs) whose backward populates the gradients of
        ``hidden`` and ``weight``, and the floats of ``cipo_policy_loss``: ``loss/base``, ``loss/corr``,
        ``pg_loss``, ``clipfrac``, ``clipfrac_lower``, ``approx_kl``, ``kl`` (with ``ref_logp``), ``entropy``
        (always), ``tis_clipfrac`` (with TIS), ``tokens/base``, ``tokens/corr``.

    Raises:
        ValueError: wrong shapes/dtypes/devices (naming the argument and shape), targets outside ``[0, V)`` other
            than -100, a loss token without a target, missing ``ref_logp``/``rollout_logp`` the config needs.

    Not supported: double backward; backward twice through one call (the stored gradient is handed over).
    """
    if not isinstance(config, PolicyLossConfig):
        raise ValueError(f"config must be a PolicyLossConfig; got {type(config).__name__}")
    if not (isinstance(lambda_corr, (int, float)) and not isinstance(lambda_corr, bool) and lambda_corr >= 0):
        raise ValueError(f"lambda_corr must be a float >= 0; got {lambda_corr!r}")
    _validate(hidden, weight, batch)  # tiling and dw_accum: checked by the kernel entry
    if config.kl_coef > 0 and batch.ref_logp is None:
        raise ValueError("config.kl_coef > 0 needs ref_logp (the reference policy's log-probs)")
    if config.tis_mode is not None and batch.rollout_logp is None:
        raise ValueError(f"config.tis_mode={config.tis_mode!r} needs rollout_logp (the rollout engine's "
                         "log-probs)")
    inputs = fused_loss_inputs(batch, config, lambda_corr, advantages, estimator, base_normalizer, corr_normalizer,
                               accum_dtype(hidden.dtype), hidden.device)
    if check_finite:
        check_finite_tensors("fused_linear_policy_loss", {
            "hidden": hidden, "weight": weight, "advantages": inputs["advantages"], "old_logp": inputs["old_logp"],
            "ref_logp": inputs["ref_logp"], "rollout_logp": inputs["rollout_logp"]})
    loss, sums = fused_linear_policy_loss_flat(hidden, weight, **inputs, chunk_tokens=chunk_tokens, tiling=tiling,
                                               dw_accum=dw_accum)
    if check_finite:
        check_finite_tensors("fused_linear_policy_loss", {"loss": loss})
    part_masks = inputs["part_masks"]
    return loss, inputs["plan"].metrics(sums, {"tokens/base": part_masks[0].sum(), "tokens/corr": part_masks[1].sum()})


def fused_loss_inputs(batch: PackedBatch, config: PolicyLossConfig, lambda_corr: float,
                      advantages: Optional[torch.Tensor], estimator: str, base_normalizer: Optional[float],
                      corr_normalizer: Optional[float], dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """The keyword arguments of ``fused_linear_policy_loss_flat`` for ``batch`` (all rows, compute ``dtype``):
    token tensors ``[T]`` zeroed outside the loss, per-token advantages, the two stream parts and the plan.

    What :func:`fused_linear_policy_loss` hands the kernel (the batch is not validated here: that is the entry's
    job); public so that a test can build the kernel's rows (``token_rows(**inputs, dtype=...)``) exactly as the
    entry does."""
    n = batch.num_tokens
    num_seqs = batch.num_seqs
    mask = batch.loss_mask.to(device).bool()
    seq_index = batch.seq_index().to(device)
    zero = torch.zeros((), dtype=dtype, device=device)

    def clean(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        # Values outside the loss may be anything (NaN): zeroed, so neither a value nor a gradient can leak.
        return None if t is None else torch.where(mask, t, zero).contiguous()

    if advantages is None:
        reward = batch.reward.double() if dtype == torch.float64 else batch.reward
        advantages = group_advantages(reward, batch.group_id, estimator=estimator)
    if not isinstance(advantages, torch.Tensor) or not advantages.is_floating_point():
        raise ValueError(f"advantages must be a floating tensor [S] or [T]; got {_describe(advantages)}")
    adv = advantages.detach().to(device=device, dtype=dtype)
    if adv.shape != (n,) and adv.shape == (num_seqs,):
        adv = adv[seq_index]
    elif adv.shape != (n,):
        raise ValueError(f"advantages must be per-token [T] = ({n},) or per-sequence [S] = ({num_seqs},); got shape "
                         f"{tuple(advantages.shape)}")
    token_stream = batch.stream.to(device)[seq_index]
    parts = [StreamPart("base", mask & (token_stream == BASE_STREAM), 1.0, base_normalizer),
             StreamPart("corr", mask & (token_stream == CORRECTION_STREAM), float(lambda_corr), corr_normalizer)]
    default_scale = float(batch.seq_lens.max()) if num_seqs else 1.0
    scale = config.loss_scale_factor if config.loss_scale_factor is not None else default_scale
    return {
        "targets": batch.targets.to(device), "mask": mask, "seq_index": seq_index, "num_seqs": num_seqs,
        "part_masks": [part.mask for part in parts], "advantages": clean(adv),
        "plan": loss_plan(config, parts, scale, has_ref=batch.ref_logp is not None, has_entropy=True),
        "old_logp": clean(_token_tensor(batch.old_logp, "old_logp", n, dtype, device)),
        "ref_logp": clean(_token_tensor(batch.ref_logp, "ref_logp", n, dtype, device)),
        "rollout_logp": clean(_token_tensor(batch.rollout_logp, "rollout_logp", n, dtype, device)),
    }



def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"shape {tuple(t.shape)} dtype {t.dtype}"
    return f"a {type(t).__name__}"


def _validate(hidden: torch.Tensor, weight: torch.Tensor, batch: PackedBatch) -> None:
    """Shapes, dtypes, devices and target range; ``ValueError`` naming the argument and its shape."""
    if not isinstance(batch, PackedBatch):
        raise ValueError(f"batch must be a PackedBatch; got {type(batch).__name__}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a 2-D floating tensor [T, H]; got {_describe(hidden)}")
    if hidden.shape[0] != batch.num_tokens:
        raise ValueError(f"hidden must be [T, H] with T = batch.num_tokens = {batch.num_tokens}; got shape "
                         f"{tuple(hidden.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating tensor [V, H]; got {_describe(weight)}")
    if weight.shape[1] != hidden.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, H] with V >= 1 and H = hidden.shape[1] = {hidden.shape[1]}; got "
                         f"shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} (shape {tuple(weight.shape)}) must equal hidden dtype "
                         f"{hidden.dtype} (shape {tuple(hidden.shape)})")
    if weight.device != hidden.device or batch.targets.device != hidden.device:
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and the batch must share a "
                         f"device; got {hidden.device}, {weight.device}, {batch.targets.device}")
    n_vocab = weight.shape[0]
    targets, mask = batch.targets, batch.loss_mask
    if targets.shape != (batch.num_tokens,) or mask.shape != (batch.num_tokens,):
        raise ValueError(f"batch.targets and batch.loss_mask must be [T] = ({batch.num_tokens},); got "
                         f"{tuple(targets.shape)} and {tuple(mask.shape)}")
    ignored = targets == IGNORE_INDEX
    bad_range = ~ignored & ((targets < 0) | (targets >= n_vocab))
    bad_mask = mask.bool() & ignored
    flags = torch.stack([bad_range.any(), bad_mask.any()]).tolist() if targets.numel() else [False, False]
    if flags[0]:
        raise ValueError(f"batch.targets (shape {tuple(targets.shape)}) must lie in [0, V = {n_vocab}) or equal "
                         f"{IGNORE_INDEX}; found {int(targets[bad_range][0])}")
    if flags[1]:
        raise ValueError(f"batch.loss_mask covers a position whose target is {IGNORE_INDEX} (token "
                         f"{int(torch.nonzero(bad_mask)[0])}); such a token has no log-prob")


def _token_tensor(value: Optional[torch.Tensor], name: str, n: int, dtype: torch.dtype, device: torch.device
                  ) -> Optional[torch.Tensor]:
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.shape != (n,) or not value.is_floating_point():
        raise ValueError(f"batch.{name} must be a floating tensor [T] = ({n},); got {_describe(value)}")
    return value.detach().to(device=device, dtype=dtype)
