"""A tiny Qwen3 policy and a character-level tokenizer, built in code (no hub access).

The tokenizer is character level over printable ASCII plus newline, with ``\\boxed{`` as one token (every answer
ends with it) and Qwen-style chat markers. Any English correction template therefore encodes without ``<unk>``.
Both the model and the tokenizer are saved with ``save_pretrained`` so that transformers and vLLM load the
directory offline.

Sizes (defaults): vocab 103 (exactly the tokenizer, so every id the model can sample decodes), hidden 128,
2 layers, 4 query heads and 2 KV heads of head_dim 32 (vLLM's CPU attention supports head sizes 32, 64, 80, ...),
MLP 512, untied LM head: 0.52 M parameters, fp32.
"""

from __future__ import annotations

import os
from typing import Any

import torch

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|im_end|>"  # generation stops at the end of the assistant turn, as in Qwen chat models
IM_START = "<|im_start|>"
ENDOFTEXT = "<|endoftext|>"
UNK_TOKEN = "<unk>"
BOXED = "\\boxed{"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, IM_START, EOS_TOKEN, ENDOFTEXT, UNK_TOKEN)

# Qwen-style ChatML. No bos token is prepended (as in Qwen3); the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}


def _base_vocab() -> dict[str, int]:
    """Token -> id: special tokens first, then ``\\boxed{``, then newline and printable ASCII (deterministic)."""
    tokens = list(SPECIAL_TOKENS) + [BOXED, "\n"] + [chr(c) for c in range(32, 127)]
    return {t: i for i, t in enumerate(tokens)}


def build_tiny_tokenizer(save_dir: str | os.PathLike | None = None):
    """Build the character-level chat tokenizer; save it to ``save_dir`` if given.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos/unk set and a ChatML chat template.
        The text of every id decodes back exactly (characters are fused without separators).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = _base_vocab()
    # A BPE model with no merges maps every character to its own id; the whole text is one "word"
    # (no pre-tokenizer), so spaces and newlines are ordinary characters.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    core.decoder = decoders.Fuse()
    # Added tokens are matched before the model runs: special ones are the markers, "\boxed{" is a normal one
    # (it must survive skip_special_tokens when responses are decoded).
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    core.add_tokens([AddedToken(BOXED, special=False, normalized=False)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START, ENDOFTEXT],
        clean_up_tokenization_spaces=False,
        model_max_length=DEFAULT_MODEL_CONFIG["max_position_embeddings"],
        padding_side="left",  # batched generation pads on the left
    )
    tok.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


def build_tiny_model(
    save_dir: str | os.PathLike | None = None, tokenizer=None, seed: int = 0, **overrides: Any
):
    """Build a randomly initialised ``Qwen3ForCausalLM`` (fp32, eager-free: sdpa attention).

    Args:
        save_dir: where to ``save_pretrained`` (safetensors + config + generation config); ``None`` = don't save.
        tokenizer: the tokenizer whose special ids go into the config; built with ``build_tiny_tokenizer`` if None.
        seed: torch seed for the initialisation (the same seed gives bit-identical weights).
        **overrides: any ``Qwen3Config`` field, e.g. ``hidden_size=256, num_hidden_layers=2``.
    """
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    if tokenizer is None:
        tokenizer = build_tiny_tokenizer()
    cfg = dict(DEFAULT_MODEL_CONFIG)
    cfg.update(overrides)
    cfg.setdefault("vocab_size", len(tokenizer))
    config = Qwen3Config(
        **cfg,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    # Only the special ids: sampling knobs come from the caller (SamplingConfig), never from saved defaults.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.eval()
    if save_dir is not None:
        model.save_pretrained(str(save_dir))
    return model
