"""Risk-averse shaping: transition counts on constructed cases, the two shaping targets."""

from __future__ import annotations

import pytest
import torch

from cipo import group_advantages
from cipo.algorithm import TRANSITIONS, shape_advantages, shape_rewards, transition_counts


def test_counts_on_a_constructed_case():
    cond = [True, True, True, False, False, False, False, True]
    out = [True, False, False, True, False, False, False, True]
    counts = transition_counts(cond, out)
    assert counts == {"incorrect_to_correct": 1, "incorrect_to_incorrect": 3, "correct_to_correct": 2,
                      "correct_to_incorrect": 2}
    assert tuple(counts) == TRANSITIONS and sum(counts.values()) == len(cond)


@pytest.mark.parametrize("cond,out,key", [([True], [True], "correct_to_correct"),
                                          ([True], [False], "correct_to_incorrect"),
                                          ([False], [True], "incorrect_to_correct"),
                                          ([False], [False], "incorrect_to_incorrect")])
def test_each_transition_alone(cond, out, key):
    counts = transition_counts(torch.tensor(cond), torch.tensor(out))
    assert counts[key] == 1 and sum(counts.values()) == 1


def test_reward_target_subtracts_alpha_on_regressions_only():
    cond = [True, True, False, False]
    out = [True, False, True, False]
    res = shape_rewards(cond, out, [1.0, 0.0, 1.0, 0.0], alpha=0.5, target="reward")
    assert res.rewards == [1.0, -0.5, 1.0, 0.0]
    assert res.regression == [False, True, False, False]
    assert res.retention == 0.5 and res.correction_rate == 0.5
    m = res.metrics()
    assert m["shaping/correct_to_incorrect"] == 1.0 and m["shaping/retention"] == 0.5


def test_advantage_target_keeps_rewards_and_marks_regressions():
    res = shape_rewards([True, True], [True, False], torch.tensor([1.0, 0.0]), alpha=0.5, target="advantage")
    assert res.rewards == [1.0, 0.0] and res.regression == [False, True]
    adv = shape_advantages(torch.tensor([0.7, -0.7]), res.regression, 0.5)
    assert torch.equal(adv, torch.tensor([0.7, -1.2]))


def test_empty_and_one_sided_cases():
    res = shape_rewards([], [], [], alpha=1.0)
    assert res.rewards == [] and res.retention is None and res.correction_rate is None
    assert shape_rewards([False, False], [False, True], [0, 1], 1.0).retention is None


def test_why_the_default_shapes_advantages():
    """Within one correction group every rollout shares the conditioning trajectory, so ``r − α`` on binary
    rewards is an affine map and GRPO's normalisation undoes it; an all-regressed group stays at zero."""
    group = torch.zeros(8, dtype=torch.long)
    rewards = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    correct = [r == 1.0 for r in rewards]
    shaped = shape_rewards([True] * 8, correct, rewards, alpha=0.5, target="reward").rewards
    plain_adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), group)
    shaped_adv = group_advantages(torch.tensor(shaped, dtype=torch.float64), group)
    assert torch.allclose(plain_adv, shaped_adv, atol=1e-5)  # reward shaping: no effect (up to ε)
    all_wrong = shape_rewards([True] * 8, [False] * 8, [0.0] * 8, alpha=0.5, target="reward").rewards
    assert torch.equal(group_advantages(torch.tensor(all_wrong), group), torch.zeros(8))
    res = shape_rewards([True] * 8, [False] * 8, [0.0] * 8, alpha=0.5, target="advantage")
    adv = shape_advantages(group_advantages(torch.tensor(res.rewards), group), res.regression, 0.5)
    assert torch.equal(adv, torch.full((8,), -0.5))  # advantage shaping: a signal where GRPO has none


def test_invalid_inputs():
    with pytest.raises(ValueError, match="alpha"):
        shape_rewards([True], [True], [1.0], alpha=-1)
    with pytest.raises(ValueError, match="target"):
        shape_rewards([True], [True], [1.0], alpha=1, target="logit")
    with pytest.raises(ValueError, match="one per correction rollout"):
        transition_counts([True, False], [True])
    with pytest.raises(ValueError, match="rewards"):
        shape_rewards([True], [True], [1.0, 2.0], alpha=1)
    with pytest.raises(ValueError, match="same length"):
        shape_advantages(torch.zeros(3), [True], 0.5)
