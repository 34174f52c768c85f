"""Shared fixture of the rollout tests: a tiny checkpoint.

vLLM runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), set here before anything imports vllm.
"""

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from tests._tiny import ensure_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("tiny_rollout") / "tiny", seed=0)
