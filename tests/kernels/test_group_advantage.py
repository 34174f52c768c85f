"""``cipo.group_advantages`` through the Triton kernel (interpreter on CPU) against the float64 reference.

Run: ``python -m pytest tests/kernels/test_group_advantage.py`` (tests/kernels/conftest.py sets
``TRITON_INTERPRET=1``; each test sets ``CIPO_FORCE_TRITON`` itself).

Reference: ``cipo.group_advantages`` on the same float32 rewards cast to float64 (which takes the torch path).

Tolerance: ``|A − A_ref| ≤ 1e-5·|A_ref| + 1e-6``. The kernel works on deviations from the group's first reward,
so its rounding is relative to the group's spread: |δ(r − mean)| ≲ log2(n)·u·max|r − r₀| with u = 2⁻²⁴, and for
grpo the relative error of the std adds a few u; for the test groups (n ≤ 1500, max|r − r₀|/std ≤ ~10) this is
≲ 1e-5·|A| + 1e-6 with a wide margin. Group-of-one and all-equal rules are checked exactly.
"""

from __future__ import annotations

import os

import pytest
import torch
from cipo.kernels import group_advantage as gak

import cipo

ESTIMATORS = ("grpo", "drgrpo", "rloo")
RTOL, ATOL = 1e-5, 1e-6
# On a GPU machine with TRITON_INTERPRET=0 the Triton side runs on CUDA tensors.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.fixture(autouse=True)
def _interpreter_active():
    if DEVICE == "cpu" and type(gak._group_advantage_kernel).__name__ != "InterpretedFunction":
        pytest.skip("cipo.kernels.group_advantage was imported before TRITON_INTERPRET=1 was set; run the kernel "
                    "tests in their own pytest process or set TRITON_INTERPRET=1 in the environment")


def triton_advantages(monkeypatch, rewards: torch.Tensor, group_ids: torch.Tensor, estimator: str,
                      eps: float = 1e-6) -> torch.Tensor:
    """The public function with the Triton path forced; asserts the kernel really ran."""
    calls = []
    real = gak.group_advantages_triton

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gak, "group_advantages_triton", counting)
    monkeypatch.setenv("CIPO_FORCE_TRITON", "1")
    out = cipo.group_advantages(rewards.to(DEVICE), group_ids.to(DEVICE), estimator=estimator, eps=eps)
    monkeypatch.delenv("CIPO_FORCE_TRITON")
    assert calls, "the Triton path was not taken"
    assert out.dtype == torch.float32
    return out.cpu()


def reference_advantages(monkeypatch, rewards: torch.Tensor, group_ids: torch.Tensor, estimator: str,
                         eps: float = 1e-6) -> torch.Tensor:
    monkeypatch.delenv("CIPO_FORCE_TRITON", raising=False)
    return cipo.group_advantages(rewards.double(), group_ids, estimator=estimator, eps=eps)


def grouped(sizes: list[int], ids: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffled group ids ``[S]`` (group ``k`` has ``sizes[k]`` members and id ``ids[k]``) and a generator."""
    gen = torch.Generator().manual_seed(seed)
    group_ids = torch.cat([torch.full((n,), gid, dtype=torch.long) for n, gid in zip(sizes, ids)])
    return group_ids[torch.randperm(group_ids.numel(), generator=gen)], gen


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_random_groups_match_reference(monkeypatch, estimator):
    # Sizes include 1 (verl's mean 0 / std 1), 2, and one group past the block cap (1500 > 1024: two blocks);
    # ids are non-contiguous and negative; S = 1558 is not a multiple of any block.
    sizes = [1, 2, 8, 5, 1, 3, 16, 7, 1500, 1, 4, 10]
    ids = [1000, -5, 7, 3, 99, 12, 0, -100, 42, 8, 64, 5]
    group_ids, gen = grouped(sizes, ids, seed=1)
    rewards = torch.randn(group_ids.numel(), generator=gen)
    for gid in (7, 12):  # all-equal groups, one of them on a value that is not exact in binary
        rewards[group_ids == gid] = 0.3
    got = triton_advantages(monkeypatch, rewards, group_ids, estimator)
    want = reference_advantages(monkeypatch, rewards, group_ids, estimator)
    torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=ATOL)
    for gid in (7, 12):
        assert bool((got[group_ids == gid] == 0).all()), "all-equal group must give exactly 0"
    single = (group_ids == 1000) | (group_ids == 99) | (group_ids == 8)
    expect_single = rewards[single].double() / (1 + 1e-6) if estimator == "grpo" else rewards[single].double()
    torch.testing.assert_close(got[single].double(), expect_single, rtol=1e-6, atol=0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_binary_rewards(monkeypatch, estimator):
    # The RLVR case: 0/1 rewards, groups of 8, some all-pass / all-fail (→ exactly 0).
    group_ids, gen = grouped([8] * 12, list(range(0, 24, 2)), seed=2)
    rewards = (torch.rand(group_ids.numel(), generator=gen) < 0.5).float()
    rewards[group_ids == 0] = 1.0
    rewards[group_ids == 2] = 0.0
    got = triton_advantages(monkeypatch, rewards, group_ids, estimator)
    want = reference_advantages(monkeypatch, rewards, group_ids, estimator)
    torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=ATOL)
    assert bool((got[(group_ids == 0) | (group_ids == 2)] == 0).all())


def test_large_offset_rewards_keep_accuracy(monkeypatch):
    # Rewards ≈ 1000 with spread 0.01: a naive fp32 mean would lose ~1e-4/0.01 = 1% of A; the shifted
    # formulation keeps the error relative to the spread.
    group_ids, gen = grouped([6, 9, 2, 33], [3, 1, 4, 1_000_000], seed=3)
    rewards = 1000.0 + 0.01 * torch.randn(group_ids.numel(), generator=gen)
    for estimator in ESTIMATORS:
        got = triton_advantages(monkeypatch, rewards, group_ids, estimator)
        want = reference_advantages(monkeypatch, rewards, group_ids, estimator)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_eps_zero_equal_group_is_zero_not_nan(monkeypatch):
    rewards = torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0])
    group_ids = torch.tensor([4, 4, 4, 9, 9])
    got = triton_advantages(monkeypatch, rewards, group_ids, "grpo", eps=0.0)
    want = reference_advantages(monkeypatch, rewards, group_ids, "grpo", eps=0.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=ATOL)
    assert got[:3].tolist() == [0.0, 0.0, 0.0]


def test_only_singletons(monkeypatch):
    rewards = torch.tensor([0.25, -2.0, 3.5])
    group_ids = torch.tensor([30, 10, 20])
    for estimator in ESTIMATORS:
        got = triton_advantages(monkeypatch, rewards, group_ids, estimator)
        want = reference_advantages(monkeypatch, rewards, group_ids, estimator)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_deterministic(monkeypatch):
    group_ids, gen = grouped([5, 17, 1, 40], [0, 1, 2, 3], seed=4)
    rewards = torch.randn(group_ids.numel(), generator=gen)
    first = triton_advantages(monkeypatch, rewards, group_ids, "grpo")
    second = triton_advantages(monkeypatch, rewards, group_ids, "grpo")
    assert torch.equal(first, second)


def test_kernel_direct_empty():
    out = gak.group_advantages_triton(torch.zeros(0, device=DEVICE), torch.zeros(0, dtype=torch.long,
                                      device=DEVICE), 0, "grpo", 1e-6)
    assert out.shape == (0,) and out.dtype == torch.float32
