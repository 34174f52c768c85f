"""A runner that trains a few GRPO steps with TRL's GRPOTrainer or cipo's subclass and records what happened."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MODEL_OVERRIDES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16)


def char_reward(completions: list[str]) -> list[float]:
    """Deterministic and spread out over random text, so groups rarely have zero variance."""
    return [float(sum(map(ord, c)) % 7) / 6 for c in completions]


@dataclass
class RunRecord:
    completions: list[list[str]] = field(default_factory=list)  # per reward call (= per generation)
    losses: list[float] = field(default_factory=list)            # per optimizer step, as logged by Trainer
    grad_norms: list[float] = field(default_factory=list)
    logs: list[dict] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)


def run_grpo(trainer_cls, model_dir: str, dataset, out_dir: str, *, max_steps: int = 3, trainer_kwargs=None,
             **config) -> RunRecord:
    """Train ``max_steps`` optimizer steps on CPU, fp32, SGD; return rollouts, logged losses and grad norms."""
    from trl import GRPOConfig

    record = RunRecord()

    def reward(completions, **_):
        record.completions.append(list(completions))
        return char_reward(completions)

    settings = dict(output_dir=out_dir, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                    max_steps=max_steps, learning_rate=0.2, optim="sgd", logging_steps=1, report_to="none",
                    use_cpu=True, bf16=False, save_strategy="no", seed=0, disable_tqdm=True,
                    dataloader_num_workers=0)
    settings.update(config)
    torch.set_num_threads(1)
    trainer = trainer_cls(model=model_dir, reward_funcs=reward, args=GRPOConfig(**settings), train_dataset=dataset,
                          **(trainer_kwargs or {}))
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry and "grad_norm" in entry:
            record.losses.append(float(entry["loss"]))
            record.grad_norms.append(float(entry["grad_norm"]))
            record.logs.append(entry)
    record.params = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
    return record


def assert_same_run(got: RunRecord, want: RunRecord, rtol: float = 1e-5, loss_atol: float = 1e-7) -> None:
    """Same rollouts; losses and grad norms within ``rtol`` (losses also within ``loss_atol``: an on-policy GRPO
    loss is -mean(A) ≈ 0 up to rounding); final weights within ``rtol`` per tensor."""
    assert got.completions == want.completions, "the rollouts differ"
    assert len(got.losses) == len(want.losses) > 0
    for step, (a, b) in enumerate(zip(got.losses, want.losses)):
        assert abs(a - b) <= max(rtol * abs(b), loss_atol), f"step {step + 1}: loss {a!r} vs TRL {b!r}"
    for step, (a, b) in enumerate(zip(got.grad_norms, want.grad_norms)):
        assert abs(a - b) <= rtol * abs(b) + 1e-12, f"step {step + 1}: grad_norm {a!r} vs TRL {b!r}"
    for name, ref in want.params.items():
        err = (got.params[name] - ref).norm() / ref.norm().clamp(min=1e-30)
        assert err <= rtol, f"weights {name} differ by {float(err):.2e} relative"


