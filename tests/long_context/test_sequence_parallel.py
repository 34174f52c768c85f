"""The pieces of Ulysses sequence parallelism that run in one process: the mask read off ``position_ids`` (equal to
the shared-prefix layout's rule and to block-diagonal causal for plain packing), the core-attention wrapper for sdpa
and flex_attention, the sharding, the loss-row split, and the config checks. The 2-rank runs are in
test_ulysses.py (attention) and test_ulysses_trainer.py (the trainer).

Tolerances: the masks are compared exactly (booleans). The wrapped sdpa and an sdpa given the reference mask run the
same kernel on the same mask: equal to 1e-6 absolute (fp32, O(1) values); flex_attention vs sdpa is a different
kernel: 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cipo import PackedBatch, SequenceSample
from cipo.packing import BASE_STREAM, CORRECTION_STREAM
from cipo.trainer.config import load_config
from cipo.trainer.config_io import ConfigError
from cipo.trainer.distributed import DistContext
from cipo.trainer.sequence_parallel import (
    UlyssesSP,
    attention_rule,
    block_mask,
    dense_mask,
    position_masked_attention,
)
from cipo.trainer.shared_prefix import SharedPrefixLayout
from tests.long_context.test_shared_prefix import mixed_batch


def _block_diagonal_causal(lengths: list[int]) -> torch.Tensor:
    total = sum(lengths)
    mask = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for n in lengths:
        mask[start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start += n
    return mask


@pytest.mark.parametrize("lengths", [[1], [7], [5, 1, 9], [1, 1, 1], [13, 4, 1, 6]])
def test_plain_packing_gives_block_diagonal_causal(lengths):
    pos = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(dense_mask(pos)[0, 0], _block_diagonal_causal(lengths))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_prefix_stream_gives_the_layouts_rule(seed):
    """The stream's position_ids alone determine the shared-prefix mask: siblings restart at the prefix length."""
    layout = SharedPrefixLayout.build(mixed_batch(vocab=50, seed=seed))
    idx = torch.arange(layout.num_tokens)
    expected = layout.allowed(idx[:, None], idx[None, :])
    assert torch.equal(dense_mask(layout.position_ids)[0, 0], expected)


def test_random_shared_prefix_streams_match_the_layout():
    """Many random groups (1-token prompts, empty and 1-token responses, repeated prompts across groups)."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        seqs = []
        for group in range(int(torch.randint(1, 5, (1,), generator=gen))):
            prompt = torch.randint(0, 30, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
                response = torch.randint(0, 30, (int(torch.randint(0, 5, (1,), generator=gen)),),
                                         generator=gen).tolist()
                stream = CORRECTION_STREAM if group % 2 else BASE_STREAM
                seqs.append(SequenceSample(prompt, response, 1.0, group, stream))
        layout = SharedPrefixLayout.build(PackedBatch.from_sequences(seqs))
        idx = torch.arange(layout.num_tokens)
        assert torch.equal(dense_mask(layout.position_ids)[0, 0], layout.allowed(idx[:, None], idx[None, :]))


def test_rule_names_documents_and_runs():
    pos = torch.tensor([0, 1, 2, 3, 2, 3, 0, 1])  # [P P r r] [r' r'] | [P r]
    document, run, run_start = attention_rule(pos)
    assert document.tolist() == [1, 1, 1, 1, 1, 1, 2, 2]
    assert run.tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    assert run_start.tolist() == [0, 0, 0, 0, 2, 2, 0, 0]
    with pytest.raises(ValueError, match=r"position_ids must be \[L\]"):
        attention_rule(pos[None])


def _qkv(length: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # [B=1, heads, L, d]; 4 query heads over 2 key/value heads (grouped-query)
    q = torch.randn(1, 4, length, 8, generator=gen)
    k = torch.randn(1, 2, length, 8, generator=gen)
    v = torch.randn(1, 2, length, 8, generator=gen)
    return q, k, v


class _Attention(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True
    training = False


def _reference(q, k, v, mask):
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def test_sdpa_wrapper_masks_from_position_ids():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pos = torch.tensor([0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 0])  # a shared prefix, a plain sequence, a 1-token one
    q, k, v = _qkv(pos.numel())
    wrapped = position_masked_attention(sdpa_attention_forward, "sdpa")
    out, _ = wrapped(_Attention(), q, k, v, None, position_ids=pos[None], scaling=8 ** -0.5)
    expected = _reference(q, k, v, dense_mask(pos))
    assert (out - expected).abs().max() <= 1e-6
    # without the wrapper sdpa attends causally across the boundaries: the test would notice a lost mask
    plain, _ = sdpa_attention_forward(_Attention(), q, k, v, None, scaling=8 ** -0.5)
    assert (plain - expected).abs().max() > 1e-2


def test_dense_mask_does_not_outlive_its_use(monkeypatch):
    """The wrapper reuses a dense mask only while something else holds it: none lingers after a step."""
    import weakref

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from cipo.trainer import sequence_parallel

    built: list[weakref.ref] = []

    def spy(position_ids):
        mask = dense_mask(position_ids)
        built.append(weakref.ref(mask))
        return mask

    monkeypatch.setattr(sequence_parallel, "dense_mask", spy)
    pos = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    q, k, v = _qkv(pos.numel(), seed=3)
    wrapped = position_masked_attention(sdpa_attention_forward, "sdpa")
    for calls in (1, 2):
        wrapped(_Attention(), q, k, v, None, position_ids=pos[None])
        assert len(built) == calls and all(ref() is None for ref in built)


def test_sdpa_wrapper_leaves_given_masks_and_decoding_alone():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pos = torch.tensor([0, 1, 2, 0, 1])
    q, k, v = _qkv(pos.numel(), seed=1)
    wrapped = position_masked_attention(sdpa_attention_forward, "sdpa")
    given = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    out, _ = wrapped(_Attention(), q, k, v, given, position_ids=pos[None])
    ref, _ = sdpa_attention_forward(_Attention(), q, k, v, given)
    assert torch.equal(out, ref)
    # one query against a cache of 5 keys: not a whole stream, passed through
    out, _ = wrapped(_Attention(), q[:, :, -1:], k, v, None, position_ids=pos[None, -1:])
    ref, _ = sdpa_attention_forward(_Attention(), q[:, :, -1:], k, v, None)
    assert torch.equal(out, ref)


def test_flex_wrapper_replaces_a_causal_block_mask_on_cpu(monkeypatch):
    """The BlockMask is built once, by ``prepare`` (before the forward, outside flex's compiled region), and used by
    every later call on the same stream."""
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers.integrations.flex_attention import flex_attention_forward

    from cipo.trainer import sequence_parallel

    builds: list[int] = []

    def counted(position_ids):
        builds.append(position_ids.numel())
        return block_mask(position_ids)

    monkeypatch.setattr(sequence_parallel, "block_mask", counted)
    pos = torch.cat([torch.arange(37), torch.arange(20, 45), torch.arange(61)])  # segment with a sibling, a plain one
    q, k, v = _qkv(pos.numel(), seed=2)
    causal = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, None, pos.numel(), pos.numel(), device="cpu")
    wrapped = position_masked_attention(flex_attention_forward, "flex_attention")
    wrapped.prepare(pos)
    expected = _reference(q, k, v, dense_mask(pos))
    for _ in range(2):  # two layers
        out, _ = wrapped(_Attention(), q, k, v, causal, position_ids=pos[None], scaling=8 ** -0.5)
        assert (out - expected).abs().max() <= 1e-5
    assert builds == [pos.numel()]


# ------------------------------------------------------------------------------------------------ the group


class _Group(UlyssesSP):
    """A group without a process group: sharding and the loss split only."""

    def __init__(self, rank: int, size: int) -> None:  # noqa: D107 - no collectives
        self.rank, self.size, self.group, self.mpu = rank, size, None, None


def test_shards_pad_with_a_separate_sequence():
    ids, pos = torch.arange(100, 107), torch.tensor([0, 1, 2, 0, 1, 2, 3])
    shards = [_Group(r, 3).shard(ids, pos) for r in range(3)]
    assert [s[0].tolist() for s in shards] == [[100, 101, 102], [103, 104, 105], [106, 0, 0]]
    assert torch.cat([s[1] for s in shards]).tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]
    assert _Group(0, 3).local_tokens(7) == 3 and _Group(0, 2).padded_length(7) == 8


def test_loss_rows_split_every_sequence_once():
    batch = mixed_batch(vocab=50)
    parts = [_Group(r, 3).loss_rows(batch) for r in range(3)]
    assert sorted(row for part in parts for row in part) == list(range(batch.num_seqs))
    single = PackedBatch.from_sequences([SequenceSample([1, 2], [3, 4], 1.0, 0, BASE_STREAM)])
    assert [_Group(r, 2).loss_rows(single) for r in range(2)] == [[0], []]


def test_config_and_ranks_are_checked():
    with pytest.raises(ConfigError, match="needs actor.strategy: deepspeed"):
        load_config(None, ["actor.ulysses_sequence_parallel_size=2"])
    with pytest.raises(ConfigError, match="attn_implementation sdpa, flex_attention or flash_attention_2"):
        load_config(None, ["actor.ulysses_sequence_parallel_size=2", "actor.strategy=deepspeed",
                           "model.attn_implementation=eager"])
    with pytest.raises(ConfigError, match="must be >= 1"):
        load_config(None, ["actor.ulysses_sequence_parallel_size=0"])
    with pytest.raises(ValueError, match="must be >= 1 and divide the 3 ranks"):
        DistContext(rank=0, world_size=3, sp_size=2)
    ctx = DistContext(rank=3, world_size=4, sp_size=2)
    assert (ctx.dp_size, ctx.dp_rank) == (2, 1)


def test_gradient_divisor_follows_deepspeeds_averaging():
    from cipo.trainer.backend import gradient_divisor

    zero = {2: {"zero_optimization": {"stage": 2}}, 3: {"zero_optimization": {"stage": 3}}}
    assert gradient_divisor(zero[3], DistContext(rank=0, world_size=4)) == 4
    assert gradient_divisor(zero[2], DistContext(rank=0, world_size=4, sp_size=2)) == 2  # world / sp
    assert gradient_divisor(zero[3], DistContext(rank=0, world_size=4, sp_size=2)) == 4  # reduce-scatter: world
    with pytest.raises(ValueError, match="reduce_scatter: true"):
        gradient_divisor({"zero_optimization": {"stage": 3, "reduce_scatter": False}},
                         DistContext(rank=0, world_size=2, sp_size=2))


def test_trainer_refuses_a_launch_the_group_does_not_divide(tmp_path):
    from cipo.trainer.trainer import CIPOTrainer

    config = load_config(None, ["actor.ulysses_sequence_parallel_size=2", "actor.strategy=deepspeed",
                                f"trainer.run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"must divide the launch's 1 rank\(s\)"):
        CIPOTrainer(config)
