"""The switches in the trainer: one CIPO step (HF rollouts) with each of them on gives the metrics of the step
without (1e-5 relative on losses and the gradient norm), and the step reports the tokens its forwards processed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from cipo.trainer.trainer import CIPOTrainer  # noqa: E402
from tests.trainer.test_train_e2e import fast_config  # noqa: E402

COMPARED = ("actor/loss", "actor/pg_loss", "actor/entropy", "actor/grad_norm", "actor/loss/base", "actor/loss/corr")


def one_step(run_dir: Path, *extra: str) -> dict:
    cfg = fast_config(run_dir, "trainer.total_steps=1", "rollout.engine=hf", "trainer.save_every=0",
                      "trainer.save_hf_model=false", "trainer.eval_prompts=1",
                      # untrained, the tiny model's rewards are often all equal (zero advantages): the entropy bonus
                      # keeps the loss and its gradient non-zero, so the comparison means something
                      "actor.loss={entropy_coef: 0.01}", *extra)
    trainer = CIPOTrainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    return one_step(tmp_path_factory.mktemp("plain"))


@pytest.mark.parametrize("switches", [
    ("actor.shared_prefix=true",),
    ("actor.tiled_mlp=true", "actor.tiled_mlp_shards=3"),
    ("model.gradient_checkpointing=true", "actor.checkpoint_offload=true"),
])
def test_switch_gives_the_same_step(baseline, tmp_path, switches):
    line = one_step(tmp_path, *switches)
    assert line["batch/tokens"] == baseline["batch/tokens"]
    compared = [k for k in COMPARED if k in baseline]
    assert "actor/loss" in compared and "actor/grad_norm" in compared
    assert baseline["actor/grad_norm"] > 0 and baseline["actor/loss"] != 0
    for key in compared:
        assert line[key] == pytest.approx(baseline[key], rel=1e-5, abs=1e-8), key
    assert baseline["batch/tokens_forward"] == baseline["batch/tokens_forward_unshared"] >= baseline["batch/tokens"]
    if "actor.shared_prefix=true" in switches:
        # every group shares its prompt: fewer tokens through the decoder than in the plain packed batch
        assert line["batch/tokens_forward"] < line["batch/tokens_forward_unshared"] == baseline["batch/tokens_forward"]
    else:
        assert line["batch/tokens_forward"] == baseline["batch/tokens_forward"]
