"""A fused LM head for TRL's ``fused_lm_head`` contract, computed by :func:`cipo.linear_logprob`.

TRL 1.16's trainers call ``model(input_ids=..., attention_mask=..., labels=labels, fused_lm_head=True)`` on a model
patched by ``trl.trainer.utils.add_fused_lm_head`` and read per-token ``log_probs`` (and ``entropy``) of the next-token
labels, zero where the label is ``-100``, shape ``[B, L-1]`` (``[B, L]`` with pre-shifted ``shift_labels``).
:func:`add_cipo_fused_lm_head` gives a model the same call with cipo's kernel underneath; without
``fused_lm_head=True`` the call goes to the model's previous forward untouched (generation is unchanged).

This module does not import TRL: the output class mirrors TRL's field names.
"""

from __future__ import annotations

import functools
import types
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import transformers
from transformers.utils import ModelOutput

#: Per-token outputs of TRL's head that cipo computes; the others (log_sum_sq_probs, mean_logits, is_top1) are refused.
SUPPORTED_OUTPUTS = ("log_probs", "entropy")

# Config attributes that rescale or squash the logits before the softmax (TRL folds them into its kernel; cipo's
# kernel has only a temperature), so a model that sets any of them is refused.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


@dataclass
class CipoFusedCausalLMOutput(ModelOutput):
    """What a model patched by :func:`add_cipo_fused_lm_head` returns with ``fused_lm_head=True``.

    The fields and their meaning are those of TRL's ``FusedCausalLMOutput``: ``loss`` is the summed negative
    log-likelihood of the non-ignored labels divided by ``num_items_in_batch`` (their count when not given);
    ``log_probs``/``entropy`` are per token and 0 where the label is ``-100``; ``label_mask`` marks the scored tokens.
    ``log_sum_sq_probs``, ``mean_logits``, ``is_top1`` and ``aux_loss`` are always None here.
    """

    loss: Optional[torch.Tensor] = None
    log_probs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    label_mask: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None


def _check_model(model: torch.nn.Module, outputs: tuple[str, ...]) -> None:
    unknown = [o for o in outputs if o not in SUPPORTED_OUTPUTS]
    if unknown:
        raise ValueError(f"add_cipo_fused_lm_head: outputs {unknown} are not computed by cipo's kernel (it gives "
                         f"{SUPPORTED_OUTPUTS}); use TRL's add_fused_lm_head for them")
    text_config = model.config.get_text_config()
    for name in _LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value is not None and value != 1.0:
            raise ValueError(f"add_cipo_fused_lm_head: the model's config sets {name}={value!r}, a transform of the "
                             "logits that cipo's kernel does not apply (it divides by the temperature only); keep "
                             "TRL's own fused head for this model")
    if getattr(text_config, "output_router_logits", False):
        raise ValueError("add_cipo_fused_lm_head: the model returns MoE router logits (output_router_logits=True); "
                         "the MoE load-balancing loss is not covered by cipo's head: keep TRL's own fused head, or set "
                         "output_router_logits=False")
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"add_cipo_fused_lm_head: {type(model).__name__} has no output embedding (LM head) weight")
    if getattr(head, "bias", None) is not None:
        raise ValueError("add_cipo_fused_lm_head: the LM head has a bias, which cipo's kernel does not take")


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers always has it
        return False
    return bool(is_deepspeed_zero3_enabled())


def add_cipo_fused_lm_head(model: torch.nn.Module, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                           outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """Patch ``model`` so that ``model(..., labels=labels, fused_lm_head=True)`` scores labels with cipo's kernel.

    The contract is TRL 1.16's ``add_fused_lm_head`` (same arguments, same output fields, same shapes and zeros): the
    backbone runs with ``use_cache=False``, its last hidden states are shifted against the labels (unless
    ``shift_labels`` is given), and only the positions whose label is not ``-100`` go through
    :func:`cipo.linear_logprob`, which never holds more than one tile of the ``tokens × vocab`` logits.

    Args:
        model: a causal LM (``PreTrainedModel``); patch the base model before wrapping it with PEFT.
        temperature: the logits are divided by it, as in the rollout.
        cast_lm_head_to_fp32: run the projection in float32 outside autocast (TRL's ``cast_lm_head_to_fp32``).
        outputs: per-token fields to compute, among ``"log_probs"`` (always) and ``"entropy"``.

    Raises:
        ValueError: for outputs cipo does not compute, logit soft-capping or scaling, an LM-head bias, MoE router
            logits — each named, with what to use instead.
    """
    outputs = tuple(outputs)
    _check_model(model, outputs)
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"add_cipo_fused_lm_head: temperature must be > 0; got {temperature!r}")
    want_entropy = "entropy" in outputs
    # transformers < 5 exposes a vision-language model's language backbone as `.model`, not through `base_model`
    backbone_name = "base_model"
    if model.config.get_text_config() is not model.config and int(transformers.__version__.split(".")[0]) < 5:
        backbone_name = "model"
    previous_forward = model.forward  # TRL's fused forward, or the model's own: both pass plain calls through

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for key, value in (("labels", labels), ("shift_labels", shift_labels),
                               ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[key] = value
            return previous_forward(*args, **kwargs)
        if kwargs.get("output_router_logits"):
            raise ValueError("cipo's fused LM head does not compute the MoE load-balancing loss "
                             "(output_router_logits=True)")
        if _zero3_enabled():
            raise NotImplementedError("cipo's fused LM head under DeepSpeed ZeRO-3 is not covered (the head weight "
                                      "is partitioned and its backward recomputes from it); use TRL's fused head")
        kwargs["use_cache"] = False
        hidden = getattr(self, backbone_name)(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        head = self.get_output_embeddings()  # looked up per call: PEFT and FSDP replace it after patching
        if hasattr(head, "base_layer"):
            raise NotImplementedError("cipo's fused LM head with a PEFT adapter on lm_head is not covered (the "
                                      "kernel reads the base weight only); leave lm_head out of target_modules")
        weight = head.weight
        if type(weight).__name__ == "DTensor":  # FSDP2 shards the head: gather it (differentiably) for the kernel
            weight = weight.full_tensor()
        hidden = hidden.to(weight.device)
        targets = targets.to(weight.device)
        mask = targets != -100
        rows = hidden[mask]
        context = nullcontext()
        if cast_lm_head_to_fp32:
            rows, weight = rows.float(), weight.float()
            context = torch.autocast(rows.device.type, enabled=False)
        elif torch.is_autocast_enabled(rows.device.type):
            dtype = torch.get_autocast_dtype(rows.device.type)
            rows, weight = rows.to(dtype), weight.to(dtype)
        elif rows.dtype != weight.dtype:
            rows = rows.to(weight.dtype)
        from cipo.kernels.linear_logprob import linear_logprob

        with context:
            result = linear_logprob(rows, weight, targets[mask], temperature, return_entropy=want_entropy)
        logp, entropy = result if want_entropy else (result, None)
        # masked_scatter keeps an all-ignored micro-batch attached to the graph (a zero gradient, not an error)
        log_probs = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
        if entropy is not None:
            entropy = entropy.new_zeros(mask.shape).masked_scatter(mask, entropy)
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return CipoFusedCausalLMOutput(loss=-log_probs.sum() / denom, log_probs=log_probs, entropy=entropy,
                                       label_mask=mask)

    model.forward = types.MethodType(forward, model)
