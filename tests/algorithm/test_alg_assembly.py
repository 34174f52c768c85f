"""Step assembly: layout, λ weighting, and exact equality with plain GRPO when the correction stream is off."""

from __future__ import annotations

import random

import pytest
import torch

from cipo import (
    CORRECTION_STREAM,
    PackedBatch,
    PolicyLossConfig,
    SequenceSample,
    cipo_policy_loss,
    group_advantages,
    policy_loss,
)
from cipo.algorithm import (
    CIPOConfig,
    CorrectionTemplate,
    DifficultySelector,
    Rollout,
    RolloutGroup,
    assemble_step,
    build_correction_prompts,
    shape_correction_groups,
    step_advantages,
)

from .helpers import char_decode, char_encode, make_result


def step_loss(logp, batch, loss_config, config):
    """An assembled step's loss as the trainers compute it: ``L_base + λ·L_corr`` on :func:`step_advantages`."""
    return cipo_policy_loss(logp, batch, loss_config, lambda_corr=config.lambda_corr,
                            advantages=step_advantages(batch, config))


def make_groups(rng: random.Random, num_groups: int, group_size: int, *, logp: bool = True,
                conditioning: bool = False) -> list[RolloutGroup]:
    groups = []
    for g in range(num_groups):
        prompt = [rng.randrange(1, 100) for _ in range(rng.randint(1, 6))]
        rollouts = []
        for _ in range(group_size):
            n = rng.randint(0, 7)
            correct = rng.random() < 0.5
            lp = [-rng.random() * 3 for _ in range(n)] if logp else None
            rollouts.append(Rollout(response_ids=[rng.randrange(1, 100) for _ in range(n)], reward=float(correct),
                                    correct=correct, rollout_logp=lp))
        groups.append(RolloutGroup(prompt_ids=prompt, rollouts=rollouts, prompt_id=g,
                                   conditioning_correct=(rng.random() < 0.3) if conditioning else None))
    return groups


def test_layout_groups_streams_masks_and_logps():
    rng = random.Random(0)
    base = make_groups(rng, 3, 4)
    corr = make_groups(rng, 2, 3, conditioning=True)
    batch = assemble_step(base, corr, CIPOConfig())
    assert batch.num_seqs == 3 * 4 + 2 * 3
    assert batch.stream.tolist() == [0] * 12 + [1] * 6
    assert batch.group_id.tolist() == [g for g in range(3) for _ in range(4)] + [g for g in (3, 4) for _ in range(3)]
    assert batch.prefix_id.tolist() == batch.group_id.tolist()
    base_ids = set(batch.group_id[batch.stream == 0].tolist())
    assert base_ids.isdisjoint(batch.group_id[batch.stream == CORRECTION_STREAM].tolist())
    rows = [(grp, r) for grp in base + corr for r in grp.rollouts]
    assert batch.prompt_len.tolist() == [len(grp.prompt_ids) for grp, _ in rows]
    for (_, r), seq in zip(rows, batch.unpack()):
        assert seq.response_ids.tolist() == r.response_ids
        assert torch.allclose(seq.rollout_logp, torch.tensor(r.rollout_logp, dtype=torch.float32))
        assert torch.equal(seq.old_logp, seq.rollout_logp)  # the sampler is the old policy by default
    assert batch.num_loss_tokens() == sum(len(r.response_ids) for _, r in rows)
    assert batch.ref_logp is None
    plain = assemble_step(base, corr, mark_shared_prefixes=False)
    assert set(plain.prefix_id.tolist()) == {-1}


def test_old_logp_from_a_trainer_forward_wins():
    group = RolloutGroup(prompt_ids=[1, 2], rollouts=[Rollout([3, 4], 1.0, rollout_logp=[-1.0, -2.0],
                                                              old_logp=[-0.5, -0.25])])
    batch = assemble_step([group])
    seq = batch.unpack()[0]
    assert seq.old_logp.tolist() == [-0.5, -0.25] and seq.rollout_logp.tolist() == [-1.0, -2.0]


def test_partial_logps_and_empty_groups_raise():
    rng = random.Random(1)
    base = make_groups(rng, 2, 2)
    corr = make_groups(rng, 1, 2, logp=False)
    with pytest.raises(ValueError, match=r"logp is given for some rollouts but not for corr_groups\[0\]"):
        assemble_step(base, corr)
    with pytest.raises(ValueError, match=r"base_groups\[1\] has no rollouts"):
        assemble_step([base[0], RolloutGroup(prompt_ids=[1], rollouts=[])])


@pytest.mark.parametrize("config", [CIPOConfig(correction_enabled=False), CIPOConfig(lambda_corr=0.0),
                                    CIPOConfig(correction_batch_size=0)])
@pytest.mark.parametrize("loss_config", [PolicyLossConfig(),
                                         PolicyLossConfig(loss_agg_mode="seq-mean-token-mean", clip_ratio_high=0.28),
                                         PolicyLossConfig(loss_agg_mode="seq-mean-token-sum-norm",
                                                          tis_mode="token")])
def test_correction_off_equals_plain_grpo_exactly(config, loss_config):
    rng = random.Random(2)
    base = make_groups(rng, 4, 4)
    corr = make_groups(rng, 3, 4, conditioning=True)
    batch = assemble_step(base, corr, config)
    assert not config.correction_active and bool((batch.stream == 0).all())

    # Plain GRPO on the base sequences packed alone, through the public loss API.
    alone = PackedBatch.from_sequences([
        SequenceSample(prompt_ids=g.prompt_ids, response_ids=r.response_ids, reward=r.reward, group_id=i,
                       old_logp=r.rollout_logp, rollout_logp=r.rollout_logp)
        for i, g in enumerate(base) for r in g.rollouts])
    torch.manual_seed(0)
    logp_values = -torch.rand(alone.num_tokens, dtype=torch.float32) * 3

    logp_a = logp_values.clone().requires_grad_(True)
    loss_a, _ = step_loss(logp_a, batch, loss_config, config)
    loss_a.backward()
    logp_c = logp_values.clone().requires_grad_(True)
    loss_c, _ = cipo_policy_loss(logp_c, batch, loss_config, lambda_corr=config.lambda_corr)
    loss_c.backward()
    logp_b = logp_values.clone().requires_grad_(True)
    adv = group_advantages(alone.reward, alone.group_id)
    loss_b, _ = policy_loss(logp_b, alone.old_logp, adv, alone.loss_mask, loss_config, cu_seqlens=alone.cu_seqlens,
                            rollout_logp=alone.rollout_logp)
    loss_b.backward()
    for loss, logp in ((loss_a, logp_a), (loss_c, logp_c)):
        assert torch.equal(loss, loss_b)
        assert torch.equal(logp.grad, logp_b.grad)


def test_lambda_weights_the_correction_stream():
    rng = random.Random(3)
    base = make_groups(rng, 3, 4)
    corr = make_groups(rng, 2, 4, conditioning=True)
    for g in corr:  # make sure the correction groups carry a signal
        g.rollouts[0].reward, g.rollouts[1].reward = 1.0, 0.0
    batch = assemble_step(base, corr, CIPOConfig())
    torch.manual_seed(1)
    values = -torch.rand(batch.num_tokens, dtype=torch.float64) * 2
    grads, losses = {}, {}
    for lam in (1.0, 2.5):
        logp = values.clone().requires_grad_(True)
        loss, metrics = step_loss(logp, batch, PolicyLossConfig(), CIPOConfig(lambda_corr=lam))
        loss.backward()
        grads[lam], losses[lam] = logp.grad, (float(loss.detach()), metrics)
    corr_tok = batch.loss_mask & (batch.token_stream() == CORRECTION_STREAM)
    base_tok = batch.loss_mask & ~corr_tok
    assert torch.equal(grads[1.0][base_tok], grads[2.5][base_tok])
    assert torch.allclose(grads[2.5][corr_tok], 2.5 * grads[1.0][corr_tok])
    loss, m = losses[2.5]
    assert loss == pytest.approx(m["loss/base"] + 2.5 * m["loss/corr"])


def test_shaping_through_assembly():
    corr = [RolloutGroup([1, 2], [Rollout([5], 1.0, correct=True), Rollout([6], 0.0, correct=False)],
                         conditioning_correct=True),
            RolloutGroup([3], [Rollout([7], 0.0, correct=False), Rollout([8], 0.0, correct=False)],
                         conditioning_correct=True),
            RolloutGroup([4], [Rollout([9], 1.0, correct=True), Rollout([9], 0.0, correct=False)],
                         conditioning_correct=False)]
    base = [RolloutGroup([1], [Rollout([2], 1.0), Rollout([3], 0.0)])]

    reward_cfg = CIPOConfig(shaping_target="reward", alpha=0.5)
    shaped, res = shape_correction_groups(corr, reward_cfg)
    assert [r.reward for g in shaped for r in g.rollouts] == [1.0, -0.5, -0.5, -0.5, 1.0, 0.0]
    assert corr[0].rollouts[1].reward == 0.0  # inputs are not mutated
    assert res.counts == {"incorrect_to_correct": 1, "incorrect_to_incorrect": 1, "correct_to_correct": 1,
                          "correct_to_incorrect": 3}

    adv_cfg = CIPOConfig(alpha=0.5)
    shaped, res = shape_correction_groups(corr, adv_cfg)
    assert [r.reward for g in shaped for r in g.rollouts] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    batch = assemble_step(base, shaped, adv_cfg)
    plain = group_advantages(batch.reward, batch.group_id)
    adv = step_advantages(batch, adv_cfg, regression=res.regression)
    expected = plain.clone()
    expected[[3, 4, 5]] -= 0.5  # the regressions, rows after the two base sequences
    assert torch.equal(adv, expected)
    assert torch.equal(step_advantages(batch, reward_cfg, regression=res.regression), plain)
    with pytest.raises(ValueError, match="correction sequences"):
        step_advantages(batch, adv_cfg, regression=[True])
    with pytest.raises(ValueError, match="conditioning_correct"):
        shape_correction_groups([RolloutGroup([1], [Rollout([2], 1.0, correct=True)])], adv_cfg)
    with pytest.raises(ValueError, match="correct is None"):
        shape_correction_groups([RolloutGroup([1], [Rollout([2], 1.0)], conditioning_correct=True)], adv_cfg)


def test_build_correction_prompts_follows_the_picks():
    results = [make_result(i, 4) for i in range(4)]
    selection = DifficultySelector().select(results, 6, 0.5, 0)
    prompts = build_correction_prompts(selection, results, CorrectionTemplate(max_attempt_tokens=64),
                                       encode=char_encode, decode=char_decode)
    assert len(prompts) == 6
    for pick, prompt in zip(selection.picks, prompts):
        traj = results[pick.result_index].trajectories[pick.trajectory_index]
        assert traj.text in prompt.text and results[pick.result_index].prompt in prompt.text


def test_a_verdict_template_states_each_picks_true_verdict():
    # ρ = 0.5 replays successes too: each conditioning attempt gets the sentence of its own verification.
    results = [make_result(i, 4) for i in range(4)]
    selection = DifficultySelector().select(results, 6, 0.5, 0)
    template = CorrectionTemplate(max_attempt_tokens=64, user_format="{problem}\n{attempt}\n{verdict}",
                                  verdict_correct="VERDICT-RIGHT", verdict_incorrect="VERDICT-WRONG",
                                  allow_verdict_words=True)
    prompts = build_correction_prompts(selection, results, template, encode=char_encode, decode=char_decode)
    kinds = set()
    for pick, prompt in zip(selection.picks, prompts):
        correct = results[pick.result_index].trajectories[pick.trajectory_index].correct
        kinds.add(correct)
        assert ("VERDICT-RIGHT" in prompt.text) == correct and ("VERDICT-WRONG" in prompt.text) != correct
    assert kinds == {True, False}, "the selection must hold both kinds for this test to mean anything"
