"""Tiny models and tokenizers built in code (no hub downloads)."""

from cipo.models.tiny import (
    CHAT_TEMPLATE,
    DEFAULT_MODEL_CONFIG,
    build_tiny_model,
    build_tiny_tokenizer,
    ensure_tiny_checkpoint,
    load_tiny,
)

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_MODEL_CONFIG",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "ensure_tiny_checkpoint",
    "load_tiny",
]
