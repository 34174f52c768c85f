"""DeepSpeed's long-sequence tools (ALST, arXiv:2506.13996) behind cipo's config switches — used, not rewritten.

* ``actor.tiled_mlp`` → :func:`apply_tiled_mlp`: every gated MLP of the HF model (``gate_proj``/``up_proj``/
  ``down_proj``/``act_fn``, e.g. Qwen3MLP, LlamaMLP) runs through ``deepspeed...ulysses_sp.TiledMLP``: the MLP is
  applied to ``shards`` slices of the sequence under ``no_grad`` and recomputed slice by slice in the backward, so
  its ``[tokens, intermediate]`` activations (3 of them per layer: gate, up, act·up) exist for one slice at a
  time instead of the whole micro-batch. Exact up to the summation order; costs one extra MLP forward.
* ``actor.checkpoint_offload`` → :class:`CheckpointOffload`: DeepSpeed's ``CheckpointHiddenStatesOffload`` (a
  ``saved_tensors_hooks`` context) moves the input each gradient-checkpointed decoder layer saves — the one
  ``[tokens, hidden]`` tensor per layer that checkpointing keeps — to pinned host memory on a side stream, and
  back for the backward. It acts only on tensors on an accelerator: on CPU it runs and offloads nothing.
* Sequence-tiled logits + loss (``TiledFusedLogitsLoss``/``SequenceTiledCompute``) are not used: the fused loss
  already never holds more than a chunk of logits (docs/DESIGN.md §5) and finishes the gradient in its forward.
* Ulysses sequence parallelism (``actor.ulysses_sequence_parallel_size``) has its own module,
  :mod:`cipo.trainer.sequence_parallel`.
"""

from __future__ import annotations

import math
from types import MethodType
from typing import Any, Optional

import torch
from torch import nn

MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in MLP_PARTS) and isinstance(module.down_proj, nn.Linear)


def _gated_mlp(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module.down_proj(module.act_fn(module.gate_proj(x)) * module.up_proj(x))


def tiled_mlp_shards(tokens: int, hidden_size: int, shards: int = 0) -> int:
    """Number of sequence slices: ``shards`` if > 0, else DeepSpeed's rule ``ceil(tokens / hidden_size)`` (each
    slice's ``[slice, intermediate]`` activations about as large as one ``[hidden, intermediate]`` weight); at least
    1 and at most ``tokens``."""
    wanted = shards if shards > 0 else math.ceil(tokens / max(hidden_size, 1))
    return max(1, min(wanted, max(tokens, 1)))


def apply_tiled_mlp(model: nn.Module, shards: int = 0) -> int:
    """Route every gated MLP of ``model`` through DeepSpeed's ``TiledMLP``; returns how many were patched (0 when all
    were already: a second call is a no-op).

    The patch is per instance (``module.forward``), so other models of the process are untouched. With several
    ranks the slice count is all-reduced to its maximum: under ZeRO-3 each slice's forward gathers the MLP's
    weights (a collective), so every rank must run as many.

    Args:
        model: an HF causal LM (or any module tree with gated MLPs).
        shards: slices per MLP call; 0 = ``ceil(tokens / hidden_size)`` per call.
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    if shards < 0:
        raise ValueError(f"actor.tiled_mlp_shards must be >= 0 (0: automatic); got {shards}")
    patched = found = 0
    for module in model.modules():
        if not _is_gated_mlp(module):
            continue
        found += 1
        if getattr(module, "_cipo_tiled", False):
            continue

        def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
            n = tiled_mlp_shards(x.shape[-2], x.shape[-1], shards)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                count = torch.tensor(n, device=x.device)
                torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
                n = int(count)
            params = [self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight]
            return TiledMLP.apply(_gated_mlp, self, x, n, params)

        module.forward = MethodType(forward, module)
        module._cipo_tiled = True
        patched += 1
    if found == 0:
        raise ValueError("actor.tiled_mlp: the model has no gated MLP (gate_proj/up_proj/down_proj/act_fn) to tile")
    return patched


class CheckpointOffload:
    """DeepSpeed's ``CheckpointHiddenStatesOffload`` around one forward + backward of the trainer.

    The context must be open while the forward saves tensors and while the backward restores them, and the trainer
    calls forward and backward separately: :meth:`begin` (from the backend's forward, training forwards only) and
    :meth:`end` (after the backward, or when the forward fails). ``stats`` keeps DeepSpeed's counters of the last
    one (marked, offloaded and restored tensors and bytes).
    """

    def __init__(self, enabled: bool, **kwargs: Any) -> None:
        self.enabled = enabled
        self.kwargs = kwargs
        self._ctx: Optional[Any] = None
        self.stats: Optional[Any] = None

    def begin(self) -> None:
        if not self.enabled or not torch.is_grad_enabled() or self._ctx is not None:
            return
        from deepspeed.runtime.activation_checkpointing.offload_activations import (
            get_checkpoint_hidden_states_offloading_ctx_manager,
        )

        ctx = get_checkpoint_hidden_states_offloading_ctx_manager(**self.kwargs)
        ctx.__enter__()
        self._ctx = ctx

    def end(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(None, None, None)
            self.stats = ctx.stats


def configure_model(model: nn.Module, *, tiled_mlp: bool, tiled_mlp_shards: int = 0) -> dict[str, int]:
    """Apply the model-level switches; returns what was done (for logs and tests)."""
    done: dict[str, int] = {}
    if tiled_mlp:
        done["tiled_mlp_modules"] = apply_tiled_mlp(model, tiled_mlp_shards)
    return done
