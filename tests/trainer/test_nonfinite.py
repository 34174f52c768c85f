"""One NaN must not poison the model: an update whose loss or gradient is not finite is skipped (weights,
optimizer and schedule unchanged; ``actor/skipped_nonfinite``), K in a row stop training with a clear error, and
non-finite weights are never written to a checkpoint. NaN is injected by wrapping the backend's forward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cipo.trainer.checkpoint import latest_checkpoint, load_checkpoint
from cipo.trainer.trainer import CIPOTrainer, NonFiniteError

from .test_train_e2e import fast_config


def make_trainer(tmp_path: Path, *extra: str) -> CIPOTrainer:
    # rollout.n=4: the group size FAST sets under its older alias (tiny.yaml now sets rollout.n)
    return CIPOTrainer(fast_config(tmp_path / "run", "rollout.n=4", "rollout.engine=hf", "trainer.save_hf_model=false",
                                   *extra))


def poison(trainer: CIPOTrainer, how: str, times: int = 10**9) -> dict[str, int]:
    """Make the next ``times`` training losses NaN (``how="loss"``), or keep the loss finite but make the LM head's
    gradient NaN (``how="grad"``, one NaN hidden row's effect)."""
    original = trainer.backend.forward
    count = {"poisoned": 0}

    def forward(batch, loss_cfg, **kwargs):
        out = original(batch, loss_cfg, **kwargs)
        if kwargs.get("logp_only") or count["poisoned"] >= times:
            return out
        count["poisoned"] += 1
        loss, metrics = out
        if how == "loss":
            return loss * math.nan, metrics
        weight = trainer.model.get_output_embeddings().weight
        weight.register_hook(lambda grad: torch.full_like(grad, math.nan)) if count["poisoned"] == 1 else None
        return loss, metrics

    trainer.backend.forward = forward
    return count


def weights(trainer: CIPOTrainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_a_nonfinite_update_is_skipped_and_training_recovers(tmp_path: Path, how: str):
    trainer = make_trainer(tmp_path, "actor.warmup_steps=4")
    try:
        before, lr_before = weights(trainer), trainer.backend.lr
        poison(trainer, how, times=1)
        metrics = trainer.train_step()
        assert metrics["actor/skipped_nonfinite"] == 1.0
        assert not math.isfinite(metrics["actor/grad_norm"])
        if how == "grad":
            assert math.isfinite(metrics["actor/loss"])  # the loss alone would not have caught it
        after = weights(trainer)
        assert all(torch.equal(before[n], after[n]) for n in before), "a skipped update changed the weights"
        assert trainer.backend.lr == lr_before  # the warm-up schedule did not advance either
        assert not trainer.backend.optimizer.state  # nor did AdamW's moments (no step taken)
        assert trainer.nonfinite_streak == 1
        if how == "grad":
            trainer.model.get_output_embeddings().weight._backward_hooks.clear()
        metrics = trainer.train_step()  # the poison is spent: a normal update
        assert metrics["actor/skipped_nonfinite"] == 0.0 and trainer.nonfinite_streak == 0
        # (an untrained model's rewards are all 0, so the gradient may be 0: count the step, not weight changes)
        assert trainer.backend.scheduler.last_epoch == 1 and trainer.backend.optimizer.state
        assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    finally:
        trainer.close()


def test_k_consecutive_nonfinite_updates_stop_with_a_clear_error(tmp_path: Path):
    trainer = make_trainer(tmp_path, "actor.max_consecutive_nonfinite=2", "trainer.total_steps=4",
                           "trainer.save_every=1")
    try:
        poison(trainer, "loss")
        with pytest.raises(NonFiniteError) as exc:
            trainer.train()
    finally:
        trainer.close()
    message = str(exc.value)
    assert "step 2: 2 consecutive updates had a non-finite loss or gradient" in message
    assert "actor.max_consecutive_nonfinite=2" in message and "step_000001.pt" in message
    saved = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert saved["step"] == 1 and all(bool(torch.isfinite(t).all()) for t in saved["model"].values())


def test_nonfinite_weights_are_never_checkpointed(tmp_path: Path):
    trainer = make_trainer(tmp_path)
    try:
        trainer.save()
        with torch.no_grad():
            next(trainer.model.parameters()).view(-1)[0] = math.inf
        trainer.step = 1
        with pytest.raises(NonFiniteError, match="the weights are not finite .*; the checkpoint of step 1 was not "
                                                 "written"):
            trainer.save()
    finally:
        trainer.close()
    assert latest_checkpoint(tmp_path / "run").name == "step_000000.pt"
    assert not (tmp_path / "run" / "checkpoints" / "step_000001.pt").exists()


def test_the_limit_must_be_positive(tmp_path: Path):
    from cipo.trainer.config_io import ConfigError

    with pytest.raises(ConfigError, match="actor.max_consecutive_nonfinite must be >= 1"):
        make_trainer(tmp_path, "actor.max_consecutive_nonfinite=0")
