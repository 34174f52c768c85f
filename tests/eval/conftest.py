"""A tiny trained run shared by the evaluation tests: 2 steps of a small tiny model, no warm start, HF rollouts,
a checkpoint per step (made once per test session, ~20 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"

FAST = [
    "warmstart.max_steps=0", "trainer.total_steps=2", "trainer.num_threads=1", "trainer.save_every=1",
    "trainer.keep_checkpoints=3", "trainer.progress=false", "trainer.eval_prompts=0", "rollout.engine=hf",
    "data.synthetic_train_size=64", "data.synthetic_val_size=8",
    "algorithm.train_batch_size=4", "rollout.n=4", "algorithm.correction_batch_size=4",
    "algorithm.correction_rollouts=2", "algorithm.template={max_attempt_tokens: 24}",
    "rollout.max_response_length=12", "actor.micro_batch_tokens=384",
    "model.tiny_overrides={hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 2,"
    " num_key_value_heads: 1, head_dim: 32}",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished run directory: config.yaml, init_model/, checkpoints of steps 1 and 2, hf_model/."""
    from cipo.trainer.config import load_config
    from cipo.trainer.trainer import CIPOTrainer

    run_dir = tmp_path_factory.mktemp("eval") / "run"
    trainer = CIPOTrainer(load_config(TINY, [*FAST, f"trainer.run_dir={run_dir}"]))
    try:
        trainer.train()
    finally:
        trainer.close()
    return run_dir
