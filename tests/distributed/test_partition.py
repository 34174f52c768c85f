"""The rank bookkeeping of data parallelism, without a process group: shards, the group partition, the
DeepSpeed config, and how loss metrics of micro-batches and ranks combine."""

from __future__ import annotations

import random

import pytest

from cipo.trainer.backend import deepspeed_config
from cipo.trainer.config import load_config
from cipo.trainer.distributed import DistContext, balanced_partition, shard_bounds
from cipo.trainer.step_metrics import StepMetrics


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (5, 2), (7, 3), (16, 4), (3, 5)])
def test_shards_cover_in_order(n: int, world: int):
    bounds = [shard_bounds(n, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in rank order
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1
    assert DistContext(rank=1, world_size=world).shard(n) == bounds[1] if world > 1 else True


def test_balanced_partition_is_a_partition_and_balanced():
    rng = random.Random(3)
    for _ in range(50):
        sizes = [rng.randint(1, 500) for _ in range(rng.randint(1, 40))]
        parts = rng.randint(1, 6)
        split = balanced_partition(sizes, parts)
        assert sorted(i for part in split for i in part) == list(range(len(sizes)))
        assert all(part == sorted(part) for part in split)
        loads = [sum(sizes[i] for i in part) for part in split]
        # LPT: no part exceeds the lightest by more than the largest item
        assert max(loads) - min(loads) <= max(sizes)
        if len(sizes) >= parts:
            assert all(split), "a part without items: a rank with nothing to train on"
        assert balanced_partition(sizes, parts) == split  # deterministic: every rank computes the same


def test_step_metrics_sum_terms_and_average_means():
    # Two micro-batches on rank 0, one on rank 1. The loss terms are already normalised over the step (they add
    # up); clip fractions are per-token means (token-weighted).
    rank0, rank1 = StepMetrics(), StepMetrics()
    rank0.add_loss_metrics({"entropy": 0.25, "clipfrac": 0.5, "tokens/base": 10}, weight=10)
    rank0.add_loss_metrics({"entropy": 0.5, "clipfrac": 0.0, "tokens/base": 30}, weight=30)
    rank1.add_loss_metrics({"entropy": 0.25, "clipfrac": 1.0, "tokens/base": 20}, weight=20)
    merged = StepMetrics()
    merged.set(**{"base/reward": 0.5})
    merged.merge_loss_parts([rank0.loss_part(), rank1.loss_part()])
    assert merged.values["actor/entropy"] == pytest.approx(1.0)
    assert merged.values["actor/tokens/base"] == pytest.approx(60)
    assert merged.values["actor/clipfrac"] == pytest.approx((0.5 * 10 + 0.0 * 30 + 1.0 * 20) / 60)
    assert merged.values["base/reward"] == 0.5


def test_deepspeed_config_from_sections():
    cfg = load_config(None, ["actor.strategy=deepspeed", "deepspeed.zero_stage=3", "deepspeed.offload_param=true",
                             "deepspeed.offload_optimizer=true", "model.dtype=bfloat16", "actor.grad_clip=0.5",
                             "deepspeed.config={zero_optimization: {reduce_bucket_size: 1000}}"])
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000  # raw keys merge over the generated ones
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW"  # offloaded optimizer: DeepSpeed's CPU Adam


def test_offload_param_needs_zero3():
    from cipo.trainer.config_io import ConfigError

    with pytest.raises(ConfigError, match="deepspeed.offload_param needs deepspeed.zero_stage: 3"):
        load_config(None, ["deepspeed.zero_stage=2", "deepspeed.offload_param=true"])
