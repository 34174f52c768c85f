"""The policy loss from per-token log-probs (``cipo.policy_loss``) and CIPO's two-stream weighting
(``cipo.cipo_policy_loss``).

Both accept the padded layout (``[B, L]`` tensors) or the packed one (``[N]`` tensors + ``cu_seqlens``),
reduce it to flat token tensors, and run either the Triton kernel (CUDA tensors, or ``CIPO_FORCE_TRITON=1``)
or the torch path (:func:`loss_torch`: CPU tensors and float64). Tensors and a config in; a loss tensor and a
dict of floats out — no trainer objects, so verl, TRL or OpenRLHF can call them as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .advantages import group_advantages
from .config import PolicyLossConfig
from .kernels._dispatch import use_triton
from .kernels._loss_plan import LossPlan, metrics_to_floats
from .kernels.policy_loss_torch import aggregate, masked_mean, token_terms
from .packing import BASE_STREAM, CORRECTION_STREAM, PackedBatch


@dataclass
class FlatInputs:
    """Flat token tensors ``[N]`` of one loss call, in the compute dtype (float64 or float32)."""

    logp: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor  # bool
    seq_index: torch.Tensor  # int64
    num_seqs: int
    default_scale: float  # seq-mean-token-sum-norm's divisor when the config gives none
    ref_logp: Optional[torch.Tensor] = None
    rollout_logp: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    is_weights: Optional[torch.Tensor] = None


@dataclass
class StreamPart:
    """One stream of the joint loss: its token mask, its weight and its optional global normaliser."""

    name: str
    mask: torch.Tensor
    weight: float
    normalizer: Optional[float] = None


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                config: PolicyLossConfig, *, ref_logp: Optional[torch.Tensor] = None,
                rollout_logp: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None, loss_normalizer: Optional[float] = None,
                is_weights: Optional[torch.Tensor] = None, check_finite: bool = False
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clipped policy loss with clip-higher, dual-clip, truncated IS, KL and entropy (docs/DESIGN.md §4).

    Layouts:
        padded — ``logp, old_logp, mask [, ref_logp, rollout_logp, entropy, is_weights]``: ``[B, L]``;
        ``advantages`` ``[B, L]`` or ``[B]``. packed — the same as ``[N]`` with ``cu_seqlens [S+1]``;
        ``advantages`` ``[N]`` or ``[S]``. ``[N]`` tensors without ``cu_seqlens`` are one sequence.

    Args:
        logp: current policy log-probs of the taken tokens (gradient flows here and into ``entropy``).
        old_logp: log-probs of the policy that sampled (or of the previous update); no gradient.
        advantages: per-token or per-sequence advantages; no gradient.
        mask: bool or 0/1 — the tokens in the loss.
        config: the loss knobs.
        ref_logp: reference-policy log-probs; needed when ``config.kl_coef > 0``.
        rollout_logp: the rollout engine's log-probs; needed when ``config.tis_mode`` is set.
        entropy: per-token entropy; needed when ``config.entropy_coef > 0``.
        cu_seqlens: sequence boundaries of packed inputs.
        loss_normalizer: the global token count (token-mean) or sequence count (seq-mean-*) when this call
            sees only a part of the step (micro-batch, data-parallel rank).
        is_weights: precomputed per-token importance weights (finite, ≥ 0; e.g. verl's ``rollout_is_weights``
            or TRL's vLLM correction), multiplying each token's policy-gradient term as constants (no gradient),
            after the truncated-IS weight of ``config.tis_mode`` when both are given.
        check_finite: raise :class:`NonFiniteError` naming the input (and its first bad token) when a loss
            token's value of any input is NaN/inf, or when the loss is. Off by default: it synchronises with the
            device. Values outside ``mask`` are never checked (they are zeroed and cannot leak).

    Returns:
        ``(loss, metrics)``: a 0-dim tensor (float32, float64 for float64 inputs) and floats ``pg_loss``,
        ``clipfrac``, ``clipfrac_lower``, ``approx_kl``, plus ``kl``, ``entropy``, ``tis_clipfrac`` when
        those inputs are given.
    """
    flat = flatten_inputs(logp, old_logp, advantages, mask, ref_logp=ref_logp, rollout_logp=rollout_logp,
                          entropy=entropy, cu_seqlens=cu_seqlens, is_weights=is_weights)
    if check_finite:
        check_finite_inputs("policy_loss", flat, shape=logp.shape)
    parts = [StreamPart("all", flat.mask, 1.0, loss_normalizer)]
    loss, metrics = _loss_from_flat(flat, config, parts)
    if check_finite:
        check_finite_tensors("policy_loss", {"loss": loss})
    del metrics["loss/all"]
    return loss, metrics


def cipo_policy_loss(logp: torch.Tensor, batch: PackedBatch, config: PolicyLossConfig, *,
                     lambda_corr: float = 1.0, advantages: Optional[torch.Tensor] = None,
                     estimator: str = "grpo", entropy: Optional[torch.Tensor] = None,
                     base_normalizer: Optional[float] = None, corr_normalizer: Optional[float] = None,
                     check_finite: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """CIPO's joint loss ``L_base + λ · L_corr`` on a packed batch, each stream aggregated on its own.

    With no correction sequences this is exactly the plain GRPO loss (:func:`policy_loss` on the batch).

    Args:
        logp: ``[N]`` current log-probs of ``batch.targets``.
        batch: the packed step; ``batch.old_logp`` must be set; ``ref_logp``/``rollout_logp`` are used when
            the config asks for KL / truncated IS.
        config: the loss knobs.
        lambda_corr: λ, the weight of the correction stream. ≥ 0.
        advantages: ``[S]`` or ``[N]``; by default :func:`group_advantages` of ``batch.reward`` within
            ``batch.group_id`` (groups never straddle streams) with ``estimator``.
        entropy: ``[N]`` per-token entropy (needed when ``config.entropy_coef > 0``).
        base_normalizer, corr_normalizer: each stream's global token/sequence count when this batch is a
            micro-batch or a rank's shard of the step.
        check_finite: as in :func:`policy_loss` (off by default: it synchronises).

    Returns:
        ``(loss, metrics)``: metrics of :func:`policy_loss` over all loss tokens, plus ``loss/base``,
        ``loss/corr``, ``tokens/base``, ``tokens/corr``.
    """
    if not (isinstance(lambda_corr, (int, float)) and lambda_corr >= 0):
        raise ValueError(f"lambda_corr must be a float >= 0; got {lambda_corr!r}")
    if batch.old_logp is None:
        raise ValueError("batch.old_logp is None: set it to the rollout engine's log-probs, or to a trainer "
                         "forward's when a batch gets more than one update")
    if advantages is None:
        reward = batch.reward.double() if logp.dtype == torch.float64 else batch.reward
        advantages = group_advantages(reward, batch.group_id, estimator=estimator)
    flat = flatten_inputs(logp, batch.old_logp, advantages, batch.loss_mask, ref_logp=batch.ref_logp,
                          rollout_logp=batch.rollout_logp, entropy=entropy, cu_seqlens=batch.cu_seqlens)
    if check_finite:
        check_finite_inputs("cipo_policy_loss", flat, shape=logp.shape)
    token_stream = batch.stream.to(flat.seq_index.device)[flat.seq_index]
    parts = [
        StreamPart("base", flat.mask & (token_stream == BASE_STREAM), 1.0, base_normalizer),
        StreamPart("corr", flat.mask & (token_stream == CORRECTION_STREAM), float(lambda_corr), corr_normalizer),
    ]
    loss, metrics = _loss_from_flat(flat, config, parts)
    if check_finite:
        check_finite_tensors("cipo_policy_loss", {"loss": loss})
    metrics["tokens/base"] = float(parts[0].mask.sum())
    metrics["tokens/corr"] = float(parts[1].mask.sum())
    return loss, metrics


class NonFiniteError(ValueError):
    """An input (or the result) of a loss call with ``check_finite=True`` holds NaN or inf."""


def check_finite_tensors(where: str, tensors: dict[str, Optional[torch.Tensor]],
                         shape: Optional[tuple[int, ...]] = None) -> None:
    """Raise :class:`NonFiniteError` naming the first of ``tensors`` that holds NaN/inf, with its count and the
    first bad position (in ``shape``'s coordinates when given: the caller's layout before flattening).

    One device synchronisation for all of them (``isfinite(...).all()`` stacked), more only on failure."""
    present = [(name, t) for name, t in tensors.items() if t is not None and t.numel()]
    if not present:
        return
    flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in present]).tolist()
    for (name, tensor), ok in zip(present, flags):
        if ok:
            continue
        bad = ~torch.isfinite(tensor.detach().reshape(-1))
        first = int(torch.nonzero(bad)[0])
        value = float(tensor.detach().reshape(-1)[first])
        layout = shape if shape is not None and math.prod(shape) == tensor.numel() else tuple(tensor.shape)
        position = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), layout)) if layout else ()
        raise NonFiniteError(f"{where}: {name} (shape {tuple(layout)}) holds {int(bad.sum())} non-finite value(s); "
                             f"the first is {value} at index {position}")


def check_finite_inputs(where: str, flat: FlatInputs, shape: Optional[tuple[int, ...]] = None) -> None:
    """:func:`check_finite_tensors` over a call's flat inputs (values outside the mask are already zeroed)."""
    check_finite_tensors(where, {"logp": flat.logp, "old_logp": flat.old_logp, "advantages": flat.advantages,
                                 "ref_logp": flat.ref_logp, "rollout_logp": flat.rollout_logp,
                                 "entropy": flat.entropy, "is_weights": flat.is_weights}, shape=shape)


# ---------------------------------------------------------------------------------------------- internals


def _loss_from_flat(flat: FlatInputs, config: PolicyLossConfig, parts: list[StreamPart]
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    if config.kl_coef > 0 and flat.ref_logp is None:
        raise ValueError("config.kl_coef > 0 needs ref_logp (the reference policy's log-probs)")
    if config.entropy_coef > 0 and flat.entropy is None:
        raise ValueError("config.entropy_coef > 0 needs entropy (per-token entropy of the policy)")
    if config.tis_mode is not None and flat.rollout_logp is None:
        raise ValueError(f"config.tis_mode={config.tis_mode!r} needs rollout_logp (the rollout engine's "
                         "log-probs)")
    scale = config.loss_scale_factor if config.loss_scale_factor is not None else flat.default_scale
    # float64 is the reference precision: it always takes the torch path (the kernel computes in fp32).
    if flat.logp.dtype != torch.float64 and use_triton(flat.logp):
        from .kernels.policy_loss import policy_loss_triton

        plan = loss_plan(config, parts, scale, has_ref=flat.ref_logp is not None, has_entropy=flat.entropy is not None)
        loss, sums = policy_loss_triton(flat.logp, flat.old_logp, flat.advantages, flat.mask, flat.seq_index,
                                        flat.num_seqs, [part.mask for part in parts], plan, ref_logp=flat.ref_logp,
                                        rollout_logp=flat.rollout_logp, entropy=flat.entropy,
                                        is_weights=flat.is_weights)
        return loss, plan.metrics(sums)
    return loss_torch(flat, config, parts, scale)


def loss_torch(flat: FlatInputs, config: PolicyLossConfig, parts: list[StreamPart], scale: float
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """The torch path of :func:`_loss_from_flat` (CPU tensors and float64; in float64 it is the oracle the Triton
    kernel is tested against): per-token terms of :func:`~cipo.kernels.policy_loss_torch.token_terms`, each part
    aggregated, autograd backward."""
    terms = token_terms(
        flat.logp, flat.old_logp, flat.advantages, flat.mask, flat.seq_index, flat.num_seqs,
        clip_ratio_low=config.clip_ratio_low, clip_ratio_high=config.clip_ratio_high,
        clip_ratio_c=config.clip_ratio_c, kl_estimator=config.kl_estimator if flat.ref_logp is not None else None,
        tis_mode=config.tis_mode, tis_cap=config.tis_cap, ref_logp=flat.ref_logp,
        rollout_logp=flat.rollout_logp, entropy=flat.entropy, is_weights=flat.is_weights,
    )

    def agg(values: torch.Tensor, part: StreamPart) -> torch.Tensor:
        return aggregate(values, part.mask, flat.seq_index, flat.num_seqs, config.loss_agg_mode,
                         scale_factor=scale, normalizer=part.normalizer)

    loss = None
    named: dict[str, torch.Tensor] = {}
    pg_total = kl_total = ent_total = None
    for part in parts:
        pg = agg(terms.pg, part)
        part_loss = pg
        kl = ent = None
        if terms.kl is not None:
            kl = agg(terms.kl, part)
            if config.kl_coef > 0:
                part_loss = part_loss + config.kl_coef * kl
        if terms.entropy is not None:
            ent = agg(terms.entropy, part)
            if config.entropy_coef > 0:
                part_loss = part_loss - config.entropy_coef * ent
        named[f"loss/{part.name}"] = part_loss.detach()
        weighted = part_loss * part.weight
        loss = weighted if loss is None else loss + weighted
        pg_total = pg * part.weight if pg_total is None else pg_total + pg * part.weight
        if kl is not None:
            kl_total = kl * part.weight if kl_total is None else kl_total + kl * part.weight
        if ent is not None:
            ent_total = ent * part.weight if ent_total is None else ent_total + ent * part.weight

    named["pg_loss"] = pg_total.detach()
    named["clipfrac"] = masked_mean(terms.clipped, flat.mask)
    named["clipfrac_lower"] = masked_mean(terms.clipped_lower, flat.mask)
    named["approx_kl"] = masked_mean(terms.neg_log_ratio.detach(), flat.mask)
    if kl_total is not None:
        named["kl"] = kl_total.detach()
    if ent_total is not None:
        named["entropy"] = ent_total.detach()
    if terms.tis_capped is not None:
        named["tis_clipfrac"] = masked_mean(terms.tis_capped, flat.mask)
    return loss, metrics_to_floats(named)


def loss_plan(config: PolicyLossConfig, parts: list[StreamPart], scale_factor: float, *, has_ref: bool,
              has_entropy: bool) -> LossPlan:
    """The kernels' view of one loss call: the config's knobs, the stream parts, which optional inputs exist."""
    return LossPlan(
        part_names=tuple(part.name for part in parts), part_weights=tuple(float(part.weight) for part in parts),
        part_normalizers=tuple(part.normalizer for part in parts), loss_agg_mode=config.loss_agg_mode,
        scale_factor=float(scale_factor), clip_ratio_low=float(config.clip_ratio_low),
        clip_ratio_high=float(config.clip_ratio_high), clip_ratio_c=config.clip_ratio_c,
        kl_estimator=config.kl_estimator if has_ref else None, kl_coef=float(config.kl_coef),
        entropy_coef=float(config.entropy_coef), has_entropy=has_entropy, tis_mode=config.tis_mode,
        tis_cap=float(config.tis_cap), temperature=float(config.temperature),
    )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)} dtype {value.dtype}"
    return f"a {type(value).__name__}"


def flatten_inputs(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                   ref_logp: Optional[torch.Tensor] = None, rollout_logp: Optional[torch.Tensor] = None,
                   entropy: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                   is_weights: Optional[torch.Tensor] = None) -> FlatInputs:
    """Validate a padded or packed call and reduce it to :class:`FlatInputs`; errors name the argument."""
    if not isinstance(logp, torch.Tensor) or not logp.is_floating_point():
        raise ValueError(f"logp must be a floating tensor; got {_describe(logp)}")
    if logp.dim() not in (1, 2):
        raise ValueError(f"logp must be [B, L] (padded) or [N] (packed); got shape {tuple(logp.shape)}")
    if cu_seqlens is not None and logp.dim() != 1:
        raise ValueError(f"with cu_seqlens, logp must be packed [N]; got shape {tuple(logp.shape)}")
    shape = logp.shape
    dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    device = logp.device

    def token_tensor(value: Optional[torch.Tensor], name: str, required: bool) -> Optional[torch.Tensor]:
        if value is None:
            if required:
                raise ValueError(f"{name} is required")
            return None
        if not isinstance(value, torch.Tensor) or value.shape != shape:
            raise ValueError(f"{name} must have logp's shape {tuple(shape)}; got {_describe(value)}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be floating; got dtype {value.dtype}")
        return value.to(device=device, dtype=dtype).reshape(-1)

    old = token_tensor(old_logp, "old_logp", True).detach()
    ref = token_tensor(ref_logp, "ref_logp", False)
    rollout = token_tensor(rollout_logp, "rollout_logp", False)
    ent = token_tensor(entropy, "entropy", False)
    is_w = token_tensor(is_weights, "is_weights", False)
    is_w = is_w.detach() if is_w is not None else None
    ref = ref.detach() if ref is not None else None
    rollout = rollout.detach() if rollout is not None else None

    if not isinstance(mask, torch.Tensor) or mask.shape != shape:
        raise ValueError(f"mask must have logp's shape {tuple(shape)}; got {_describe(mask)}")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be bool or hold only 0 and 1 (weighted masks are not supported)")
        mask = mask != 0
    flat_mask = mask.to(device).reshape(-1)

    if logp.dim() == 2:
        num_seqs, length = shape
        seq_index = torch.arange(num_seqs, device=device).repeat_interleave(length)
        default_scale = float(length)
    else:
        n = shape[0]
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, n], device=device)
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or \
                cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor [S+1]; got {_describe(cu_seqlens)}")
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        seq_lens = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or int(cu[-1]) != n or bool((seq_lens < 0).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to the token count {n}; got {cu.tolist()[:8]}...")
        num_seqs = seq_lens.numel()
        seq_index = torch.repeat_interleave(torch.arange(num_seqs, device=device), seq_lens)
        default_scale = float(seq_lens.max()) if num_seqs else 1.0

    if not isinstance(advantages, torch.Tensor) or not advantages.is_floating_point():
        raise ValueError(f"advantages must be a floating tensor; got {_describe(advantages)}")
    adv = advantages.detach().to(device=device, dtype=dtype)
    if adv.shape == shape:
        adv = adv.reshape(-1)
    elif adv.shape == (num_seqs,):
        adv = adv[seq_index]
    else:
        per_seq = "[B]" if logp.dim() == 2 else "[S]"
        raise ValueError(f"advantages must have logp's shape {tuple(shape)} or per-sequence shape {per_seq} = "
                         f"({num_seqs},); got shape {tuple(advantages.shape)}")
    # Tokens outside the mask may hold anything (padding, NaN): zero them here so that neither a value nor a
    # gradient (0 · NaN) can leak from them; the gradient to logp/entropy there is then exactly 0.
    def clean(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else torch.where(flat_mask, t, torch.zeros((), dtype=t.dtype, device=device))

    return FlatInputs(logp=clean(logp.to(dtype).reshape(-1)), old_logp=clean(old), advantages=clean(adv),
                      mask=flat_mask, seq_index=seq_index, num_seqs=num_seqs, default_scale=default_scale,
                      ref_logp=clean(ref), rollout_logp=clean(rollout), entropy=clean(ent), is_weights=clean(is_w))
