"""Fixtures of the TRL integration tests: a tiny Qwen3 + tokenizer saved to disk and a prompt set.

The tests need TRL 1.16 (``bash scripts/integration_env.sh trl`` builds that environment); each test module skips
itself without it (this file imports nothing from TRL).
"""

from __future__ import annotations

import pytest

from ._helpers import MODEL_OVERRIDES


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from cipo.models.tiny import build_tiny_model, build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_qwen3")
    tok = build_tiny_tokenizer(path)
    build_tiny_model(path, tok, seed=0, **MODEL_OVERRIDES)
    return str(path)


@pytest.fixture(scope="session")
def prompt_dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": f"What is {i}+{3 * i}?"} for i in range(16)])

