"""LoRA adapters on the policy (``actor.lora``), through ``peft``.

Only the adapters train. The embeddings and the LM head stay frozen, so the fused loss skips the head's weight
gradient (``4·T·H·V`` FLOPs instead of ``6·T·H·V``). The rollout engine and the HF export never see adapters: they
get the merged weights ``W + scale · B A`` under the base model's own parameter names, computed from the live adapter
weights each time, so the frozen base weights are never modified (merging in place and unmerging in bf16 would
round them a little more at every step).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .config import LoraSection

_BASE_PREFIX = "base_model.model."  # where peft puts the wrapped model in parameter names
_WRAPPED = ".base_layer."  # peft's name for the original linear inside a LoRA layer


def apply_lora(model: nn.Module, section: LoraSection) -> nn.Module:
    """``model`` with LoRA adapters on ``section.target_modules`` (a ``peft`` model); every other weight frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise ImportError("actor.lora needs the peft package: pip install peft") from exc
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [name for name in section.target_modules if name not in present]
    if missing:
        raise ValueError(f"actor.lora.target_modules {missing} are not modules of this model; it has e.g. "
                         f"{sorted(n for n in present if n.endswith('_proj'))[:8]}")
    lora = LoraConfig(r=section.rank, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=list(section.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def base_model(model: nn.Module) -> nn.Module:
    """The HF model inside a peft model (the model itself otherwise)."""
    return model.get_base_model() if is_lora(model) else model


@torch.no_grad()
def merged_named_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF name, tensor)`` of the base model with every adapter merged: what a model without LoRA would hold.

    Tensors of unadapted weights are views of the live ones (do not modify); merged ones are new tensors in the base
    weight's dtype.
    """
    from peft.tuners.lora import LoraLayer

    merged: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer().weight
            delta = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters)
            merged[_hf_name(f"{name}.base_layer.weight")] = (base.float() + delta.float()).to(base.dtype)
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        hf = _hf_name(name)
        yield hf, merged.get(hf, param.detach())


def _hf_name(name: str) -> str:
    if name.startswith(_BASE_PREFIX):
        name = name[len(_BASE_PREFIX):]
    return name.replace(_WRAPPED, ".")


def lora_scaling(section: LoraSection) -> float:
    """peft's ``scaling``: ``alpha / rank`` (no rsLoRA)."""
    return section.alpha / section.rank


def merge_lora_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A peft model's state dict (a LoRA checkpoint) → the merged HF state dict, as :func:`merged_named_weights`
    gives for the live model: ``W + scaling · B A`` for every adapted weight, adapters dropped, HF names."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if "lora_" in name:
            continue
        if _WRAPPED in name:
            stem = name[: name.index(_WRAPPED)]
            a = [v for k, v in state.items() if k.startswith(f"{stem}.lora_A.")]
            b = [v for k, v in state.items() if k.startswith(f"{stem}.lora_B.")]
            if len(a) != 1 or len(b) != 1:
                raise ValueError(f"LoRA checkpoint: {stem} has {len(a)} lora_A and {len(b)} lora_B weights; "
                                 "expected one adapter")
            tensor = (tensor.float() + scaling * (b[0].float() @ a[0].float())).to(tensor.dtype)
        out[_hf_name(name)] = tensor
    return out
