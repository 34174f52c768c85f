"""CIPO's joint weighting: L_base + λ·L_corr, each stream aggregated over its own tokens."""

from __future__ import annotations

import random

import pytest
import torch

from cipo import PackedBatch, PolicyLossConfig, SequenceSample, cipo_policy_loss, group_advantages, policy_loss


def make_sequences(seed: int, stream: int, group_offset: int, groups: int = 3, per_group: int = 4):
    rng = random.Random(seed)
    seqs = []
    for g in range(groups):
        prompt = [rng.randrange(50) for _ in range(rng.randint(1, 5))]
        for _ in range(per_group):
            n = rng.randint(0, 6)
            seqs.append(SequenceSample(
                prompt, [rng.randrange(50) for _ in range(n)], float(rng.random() < 0.5), group_offset + g, stream,
                old_logp=[-rng.random() * 3 for _ in range(n)], ref_logp=[-rng.random() * 3 for _ in range(n)],
                rollout_logp=[-rng.random() * 3 for _ in range(n)]))
    return seqs


def current_logp(batch: PackedBatch, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (batch.old_logp + 0.3 * torch.randn(batch.num_tokens, generator=g)).requires_grad_()


MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("mode", MODES)
def test_no_correction_equals_plain_grpo_exactly(mode: str):
    batch = PackedBatch.from_sequences(make_sequences(0, 0, 0))
    cfg = PolicyLossConfig(loss_agg_mode=mode, kl_coef=0.05, tis_mode="token")
    logp = current_logp(batch, 1)
    joint, m = cipo_policy_loss(logp, batch, cfg, lambda_corr=0.7)
    (g_joint,) = torch.autograd.grad(joint, logp)
    adv = group_advantages(batch.reward, batch.group_id)
    plain, _ = policy_loss(logp, batch.old_logp, adv, batch.loss_mask, cfg, ref_logp=batch.ref_logp,
                           rollout_logp=batch.rollout_logp, cu_seqlens=batch.cu_seqlens)
    (g_plain,) = torch.autograd.grad(plain, logp)
    assert torch.equal(joint, plain)
    assert torch.equal(g_joint, g_plain)
    assert m["loss/corr"] == 0.0 and m["tokens/corr"] == 0.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
def test_streams_are_aggregated_separately(mode: str, lam: float):
    base = make_sequences(1, 0, 0)
    corr = make_sequences(2, 1, 100, groups=2, per_group=3)
    batch = PackedBatch.from_sequences(base + corr)
    cfg = PolicyLossConfig(loss_agg_mode=mode, kl_coef=0.1, kl_type="k2", loss_scale_factor=8.0)
    logp = current_logp(batch, 3).detach().double().requires_grad_()
    joint, m = cipo_policy_loss(logp, batch, cfg, lambda_corr=lam)

    def stream_loss(rows: list[int]) -> torch.Tensor:
        sub = batch.select(rows)
        sub_logp = torch.cat([logp[int(batch.cu_seqlens[r]):int(batch.cu_seqlens[r + 1])] for r in rows])
        adv = group_advantages(sub.reward.double(), sub.group_id)
        return policy_loss(sub_logp, sub.old_logp.double(), adv, sub.loss_mask, cfg,
                           ref_logp=sub.ref_logp.double(), cu_seqlens=sub.cu_seqlens)[0]

    expected = stream_loss(list(range(len(base)))) + lam * stream_loss(list(range(len(base), len(base) + len(corr))))
    torch.testing.assert_close(joint, expected, rtol=1e-12, atol=1e-12)
    g_joint, = torch.autograd.grad(joint, logp)
    g_expected, = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(g_joint, g_expected, rtol=1e-12, atol=1e-12)
    assert m["tokens/base"] == batch.num_loss_tokens(0) and m["tokens/corr"] == batch.num_loss_tokens(1)


def test_requires_old_logp_and_valid_lambda():
    batch = PackedBatch.from_sequences([SequenceSample([1], [2], 1.0, 0)])
    logp = torch.zeros(batch.num_tokens)
    with pytest.raises(ValueError, match="batch.old_logp is None"):
        cipo_policy_loss(logp, batch, PolicyLossConfig())
    batch.old_logp = torch.zeros(batch.num_tokens)
    with pytest.raises(ValueError, match="lambda_corr must be a float >= 0"):
        cipo_policy_loss(logp, batch, PolicyLossConfig(), lambda_corr=-1.0)


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_with_step_normalizers_sum_to_the_whole(mode: str):
    # The trainer splits a step into micro-batches and passes each stream's step-global count
    # (`stream_normalizers`): the micro-batch losses and gradients must add up to the whole step's, in every mode.
    from cipo.trainer.mini_batch import stream_normalizers

    batch = PackedBatch.from_sequences(make_sequences(4, 0, 0) + make_sequences(5, 1, 100, groups=2, per_group=3))
    cfg = PolicyLossConfig(loss_agg_mode=mode, kl_coef=0.1, loss_scale_factor=8.0)
    logp = current_logp(batch, 6).detach().double().requires_grad_()
    adv = group_advantages(batch.reward.double(), batch.group_id)
    whole, _ = cipo_policy_loss(logp, batch, cfg, lambda_corr=0.5, advantages=adv)
    base_norm, corr_norm = stream_normalizers(batch, mode)
    total = None
    for rows in ([0, 3, 4, 9, 12, 15], [1, 2, 5, 6, 7, 8, 10, 11, 13, 14, 16, 17]):
        sub = batch.select(rows)
        sub_logp = torch.cat([logp[int(batch.cu_seqlens[r]):int(batch.cu_seqlens[r + 1])] for r in rows])
        part, _ = cipo_policy_loss(sub_logp, sub, cfg, lambda_corr=0.5, advantages=adv[rows],
                                   base_normalizer=base_norm, corr_normalizer=corr_norm)
        total = part if total is None else total + part
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(total, logp)[0], torch.autograd.grad(whole, logp)[0],
                               rtol=1e-12, atol=1e-12)
