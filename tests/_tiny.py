"""A saved tiny checkpoint for the tests that load a model from disk (the rollout engines, the model tests): built
once into a directory by :mod:`cipo.models.tiny`'s builders, and loaded back offline."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from cipo.models.tiny import build_tiny_model, build_tiny_tokenizer

_MARKER = "cipo_tiny.json"


def ensure_tiny_checkpoint(path: str | os.PathLike, seed: int = 0, **overrides: Any) -> Path:
    """Build and save tokenizer + model into ``path`` unless a complete checkpoint is already there.

    A marker file, written last, records the seed and overrides; a directory without it (an interrupted
    build) is rebuilt. Returns the directory path.
    """
    path = Path(path)
    marker = path / _MARKER
    if marker.exists() and (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(path)
    build_tiny_model(path, tok, seed=seed, **overrides)
    marker.write_text(json.dumps({"seed": seed, "overrides": overrides}, sort_keys=True))
    return path


def load_tiny(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from a saved directory, offline. The model is in eval mode on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, local_files_only=True, attn_implementation="sdpa"
    )
    model.eval()
    return model, tok
