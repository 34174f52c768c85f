"""cipo's policy loss against TRL's ``_compute_loss`` on crafted batches, and the configs cipo refuses.

The batch is off-policy by construction (old log-probs = current ± 1.2, so ratios span 0.3..3.3 for both signs of
the advantage): the ε-clip, clip-higher and delta's two-sided clip all engage, which a few training steps on a tiny
model rarely achieve. Padding, truncated and empty completions are in it too.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from cipo.integrations.trl import CipoGRPOTrainer, trl_loss_config  # noqa: E402

from ._helpers import char_reward  # noqa: E402


def _reward(completions, **_):
    return char_reward(completions)


def _batch(trainer, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, P, C = 6, 5, 9
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[1, 6:] = 0
    completion_mask[2, 2:] = 0
    completion_mask[4, :] = 0  # an empty completion (e.g. masked as truncated)
    inputs = dict(prompt_ids=torch.randint(6, 103, (B, P), generator=g), prompt_mask=prompt_mask,
                  completion_ids=torch.randint(6, 103, (B, C), generator=g), completion_mask=completion_mask,
                  advantages=torch.tensor([1.3, -0.9, 0.4, -1.1, 0.7, -0.2]))
    inputs["num_items_in_batch"] = completion_mask.sum() * 3  # as if the generation batch were 3 micro-batches
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([prompt_mask, completion_mask], 1)
        logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, C)
    inputs["old_per_token_logps"] = logp + (torch.rand(B, C, generator=g) * 2.4 - 1.2)
    inputs["ref_per_token_logps"] = logp + (torch.rand(B, C, generator=g) - 0.5)
    return inputs


def _loss_and_grads(trainer, inputs: dict, grad_accum: int):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = grad_accum
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in trainer.model.named_parameters()}
    return loss.detach(), grads


KNOBS = dict(epsilon=0.2, epsilon_high=0.28, delta=1.5, beta=0.04, use_bias_correction_kl=False, entropy_coef=0.02,
             top_entropy_quantile=0.6, off_policy_mask_threshold=0.3, temperature=0.9)


@pytest.mark.parametrize("loss_type,grad_accum,triton", [("grpo", 2, False), ("bnpo", 1, False), ("dr_grpo", 2, False),
                                                         ("dapo", 2, False), ("luspo", 1, False), ("dapo", 2, True)])
def test_loss_on_crafted_batch(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, loss_type, grad_accum, triton):
    """``triton``: cipo's Triton kernels (the CUDA path; the interpreter on CPU) for the head and the loss."""
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3,
                      gradient_accumulation_steps=grad_accum, max_completion_length=12, report_to="none",
                      use_cpu=True, bf16=False, loss_type=loss_type, **KNOBS)
    torch.set_num_threads(1)
    trl_trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=_reward, args=args, train_dataset=prompt_dataset)
    cipo_trainer = CipoGRPOTrainer(model=tiny_model_dir, reward_funcs=_reward, args=args,
                                   train_dataset=prompt_dataset, cipo_loss=True)
    inputs = _batch(trl_trainer)
    want_loss, want_grads = _loss_and_grads(trl_trainer, inputs, grad_accum)
    if triton:
        monkeypatch.setenv("CIPO_FORCE_TRITON", "1")
    got_loss, got_grads = _loss_and_grads(cipo_trainer, inputs, grad_accum)

    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-5, abs=1e-7)
    for name, want in want_grads.items():
        err = float((got_grads[name] - want).norm() / want.norm())
        assert err <= 1e-5, f"{loss_type}: gradient of {name} off by {err:.2e} relative"
    # every clip branch was exercised, and cipo saw the same clipped tokens as TRL
    got_m, want_m = cipo_trainer._metrics["train"], trl_trainer._metrics["train"]
    assert got_m["cipo/clipfrac_lower"][-1] > 0, "delta's clip (cipo's dual-clip) never engaged"
    assert want_m["clip_ratio/low_mean"][-1] > 0 and want_m["clip_ratio/high_mean"][-1] > 0
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "entropy", "kl"):
        assert got_m[key][-1] == pytest.approx(want_m[key][-1], rel=1e-5), key


REFUSED = [
    (dict(loss_type="cispo"), "cispo"),
    (dict(loss_type="sapo"), "sapo"),
    (dict(loss_type="vespo"), "vespo"),
    (dict(importance_sampling_level="sequence", loss_type="grpo"), "importance_sampling_level"),
    (dict(beta=0.04), "use_bias_correction_kl"),  # TRL's default use_bias_correction_kl=True
    (dict(delta=1.1, epsilon_high=0.28), "delta"),
    (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
]


@pytest.mark.parametrize("overrides,named", REFUSED, ids=[named for _, named in REFUSED])
def test_unmappable_configs_are_refused(tmp_path, overrides, named):
    args = GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **overrides)
    with pytest.raises(ValueError, match=named) as info:
        trl_loss_config(args)
    assert "cipo_loss=False" in str(info.value)  # says what to use instead
    # the trainer refuses before loading any model (the path does not exist)
    with pytest.raises(ValueError, match=named):
        CipoGRPOTrainer(model=str(tmp_path / "no-model"), reward_funcs=_reward, args=args, cipo_loss=True)


def test_mapping_table():
    """The documented mapping of docs/integrations/trl.md, field by field."""
    args = GRPOConfig(output_dir="unused", report_to="none", use_cpu=True, loss_type="dr_grpo", epsilon=0.1,
                      epsilon_high=0.3, delta=2.0, beta=0.01, use_bias_correction_kl=False, temperature=0.7)
    cfg = trl_loss_config(args)
    assert (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c) == (0.1, 0.3, 2.0)
    assert (cfg.kl_coef, cfg.kl_estimator, cfg.entropy_coef, cfg.tis_mode) == (0.01, "k3", 0.0, None)
    assert cfg.loss_agg_mode == "token-mean" and cfg.temperature == 0.7
    default = trl_loss_config(GRPOConfig(output_dir="unused", report_to="none", use_cpu=True))
    assert (default.loss_agg_mode, default.clip_ratio_c, default.clip_ratio_high) == ("token-mean", None, 0.2)
