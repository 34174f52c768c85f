"""cipo.group_advantages against the loop reference, groups of one, equal rewards, bad input."""

from __future__ import annotations

import random

import pytest
import torch

from cipo import group_advantages

from .loop_reference import advantages_loop


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("seed", range(4))
def test_matches_loops(estimator: str, seed: int):
    rng = random.Random(seed)
    groups, rewards = [], []
    for g in rng.sample(range(-50, 1000), 9):  # non-contiguous, negative ids too
        size = rng.choice([1, 2, 3, 8])
        equal = rng.random() < 0.25
        value = rng.random()
        for _ in range(size):
            groups.append(g)
            rewards.append(value if equal else rng.choice([0.0, 1.0, rng.gauss(0, 2)]))
    order = list(range(len(groups)))
    rng.shuffle(order)  # group members need not be adjacent
    groups = [groups[i] for i in order]
    rewards = [rewards[i] for i in order]
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups), estimator)
    expected = torch.tensor(advantages_loop(rewards, groups, estimator), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert group_advantages(torch.tensor(rewards), torch.tensor(groups), estimator).dtype == torch.float32


def test_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    g = torch.tensor([7, 7, 7, 7])
    std = (1 / 3) ** 0.5  # unbiased std of [1, 0, 0, 1]
    torch.testing.assert_close(group_advantages(r, g), (r - 0.5) / (std + 1e-6))
    torch.testing.assert_close(group_advantages(r, g, "drgrpo"), r - 0.5)
    torch.testing.assert_close(group_advantages(r, g, "rloo"), (r - 0.5) * 4 / 3)


def test_group_of_one_uses_mean_zero_std_one():
    r = torch.tensor([0.7, -2.0], dtype=torch.float64)
    g = torch.tensor([0, 1])
    torch.testing.assert_close(group_advantages(r, g), r / (1 + 1e-6))
    torch.testing.assert_close(group_advantages(r, g, "drgrpo"), r)
    torch.testing.assert_close(group_advantages(r, g, "rloo"), r)


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_equal_rewards_give_exact_zero(estimator: str):
    r = torch.tensor([0.1, 0.1, 0.1, 1 / 3, 1 / 3], dtype=torch.float32)
    adv = group_advantages(r, torch.tensor([0, 0, 0, 1, 1]), estimator)
    assert torch.equal(adv, torch.zeros(5))


def test_empty():
    assert group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rewards=torch.zeros(2, 2)), "rewards must be a 1-D tensor"),
    (dict(group_ids=torch.zeros(3, dtype=torch.long)), "group_ids must be a tensor of the same shape"),
    (dict(group_ids=torch.zeros(2)), "group_ids must hold integers"),
    (dict(rewards=torch.tensor([0.0, float("nan")])), r"rewards\[1\] is not finite"),
    (dict(estimator="ppo"), "estimator must be one of"),
    (dict(eps=-1.0), "eps must be"),
])
def test_bad_input(kwargs: dict, message: str):
    args = dict(rewards=torch.zeros(2), group_ids=torch.zeros(2, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        group_advantages(**args)
