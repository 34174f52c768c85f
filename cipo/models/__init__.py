"""Tiny models and tokenizers built in code (no hub downloads); real models from local GGUF files."""

from cipo.models.gguf_source import ModelSourceError, resolve_model_source
from cipo.models.tiny import (
    CHAT_TEMPLATE,
    DEFAULT_MODEL_CONFIG,
    build_tiny_model,
    build_tiny_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_MODEL_CONFIG",
    "ModelSourceError",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "resolve_model_source",
]
