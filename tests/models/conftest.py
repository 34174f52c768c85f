"""Shared tiny checkpoint for the model tests (built once per session, offline)."""

import pytest

from tests._tiny import ensure_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("tiny_models") / "tiny", seed=0)
