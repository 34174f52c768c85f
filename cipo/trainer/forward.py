"""The packed policy forward: one flat token stream in, the final hidden states out — never the logits.

HF causal LMs isolate packed sequences exactly when given ``position_ids`` that restart at 0 per sequence, a
batch of one, no attention mask and ``use_cache=False`` (transformers then builds a block-diagonal causal mask
for sdpa/eager, and flash-attn varlen uses the same boundaries). The LM head is *not* applied here: the
hidden states go to the fused loss, which multiplies by the head's weight chunk by chunk.
"""

from __future__ import annotations

import torch
from torch import nn


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The ``[V, H]`` weight of a causal LM's output projection (tied or not)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError("the policy needs a bias-free linear LM head (get_output_embeddings() returned "
                         f"{type(head).__name__})")
    return head.weight


def packed_hidden_states(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states of a packed stream.

    Args:
        model: a transformers ``*ForCausalLM`` (its ``.model`` is the decoder stack, ending in the final norm).
        input_ids: ``[N]`` int64, the packed sequences.
        position_ids: ``[N]`` int64, restarting at 0 for every sequence.

    Returns:
        ``[N, H]`` hidden states in the model's dtype, ready for the LM head.
    """
    if input_ids.dim() != 1 or position_ids.shape != input_ids.shape:
        raise ValueError(f"input_ids and position_ids must both be [N]; got {tuple(input_ids.shape)} and "
                         f"{tuple(position_ids.shape)}")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = decoder(input_ids=input_ids[None], position_ids=position_ids[None], use_cache=False)
    return out.last_hidden_state[0]
