"""fp32 master weights for half-precision training on one process (``model.dtype: bfloat16``, strategy torch).

The model holds bf16 weights (fast forward/backward, half the activation memory); the optimizer holds an fp32 copy
of every trainable bf16 weight and updates that copy, which is rounded into the model after each step. Without it,
AdamW's updates smaller than half a bf16 ulp of a weight (most of them at RL learning rates) would be lost. DeepSpeed
does the same with its ``bf16`` section; this is the torch backend's equivalent.
"""

from __future__ import annotations

import torch
from torch import nn


class MasterWeights:
    """fp32 copies of a model's trainable half-precision parameters.

    ``params`` is what the optimizer updates: the fp32 masters for half parameters, the parameters themselves when
    they are already fp32 (e.g. LoRA adapters that peft keeps in fp32).
    """

    def __init__(self, parameters: list[nn.Parameter]) -> None:
        self.model_params = list(parameters)
        self.params: list[torch.Tensor] = [
            p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True) for p in self.model_params]

    @staticmethod
    def needed(parameters: list[nn.Parameter]) -> bool:
        return any(p.dtype in (torch.bfloat16, torch.float16) for p in parameters)

    def pull_grads(self) -> None:
        """Model gradients → fp32 master gradients (after the backward passes, before clipping)."""
        for model_p, master in zip(self.model_params, self.params):
            if master is model_p:
                continue
            master.grad = None if model_p.grad is None else model_p.grad.float()

    @torch.no_grad()
    def push(self) -> None:
        """Updated masters → the model's weights, rounded to their dtype (after the optimizer step)."""
        for model_p, master in zip(self.model_params, self.params):
            if master is not model_p:
                model_p.copy_(master)

    def zero_grad(self) -> None:
        for master in self.params:
            master.grad = None

    def state_dict(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        if len(state) != len(self.params):
            raise ValueError(f"the checkpoint holds {len(state)} master weights, this model {len(self.params)}")
        for master, saved in zip(self.params, state):
            if saved.shape != master.shape:
                raise ValueError(f"a master weight of shape {tuple(saved.shape)} in the checkpoint does not fit "
                                 f"{tuple(master.shape)}")
            master.copy_(saved)
        self.push()
