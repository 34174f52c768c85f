"""PackedBatch: layout, validation errors (field + row), select/unpack/micro-batches, device moves."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cipo import IGNORE_INDEX, PackedBatch, SequenceSample


def sample_batch() -> PackedBatch:
    return PackedBatch.from_sequences([
        SequenceSample([5, 6], [7, 8, 9], 1.0, group_id=0, old_logp=[-0.1, -0.2, -0.3]),
        SequenceSample([5, 6], [4], 0.0, group_id=0, old_logp=[-0.4]),
        SequenceSample([3], [], 0.0, group_id=1, old_logp=[]),  # empty response: fully masked
        SequenceSample([1, 2, 3], [2, 2], 1.0, group_id=10, stream=1, old_logp=[-1.0, -2.0], prefix_id=4),
    ])


def test_layout():
    b = sample_batch()
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 5, 8, 9, 14]
    assert b.input_ids.tolist() == [5, 6, 7, 8, 9, 5, 6, 4, 3, 1, 2, 3, 2, 2]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 0, 1, 2, 3, 4]
    assert b.targets.tolist() == [6, 7, 8, 9, IGNORE_INDEX, 6, 4, IGNORE_INDEX, IGNORE_INDEX, 2, 3, 2, 2,
                                  IGNORE_INDEX]
    assert b.loss_mask.tolist() == [0, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0]
    assert b.old_logp[b.loss_mask].tolist() == pytest.approx([-0.1, -0.2, -0.3, -0.4, -1.0, -2.0])
    assert b.ref_logp is None and b.rollout_logp is None
    assert b.stream.tolist() == [0, 0, 0, 1] and b.prompt_len.tolist() == [2, 2, 1, 3]
    assert b.num_loss_tokens(0) == 4 and b.num_loss_tokens(1) == 2 and b.max_seqlen == 5


def test_unpack_round_trip():
    b = sample_batch()
    again = PackedBatch.from_sequences(b.unpack())
    for name in ("input_ids", "targets", "loss_mask", "cu_seqlens", "group_id", "stream", "old_logp", "prefix_id"):
        assert torch.equal(getattr(again, name), getattr(b, name)), name


def test_select_and_split_tokens():
    b = sample_batch()
    sub = b.select([3, 0])
    sub.validate()
    assert sub.cu_seqlens.tolist() == [0, 5, 10]
    assert sub.input_ids.tolist() == [1, 2, 3, 2, 2, 5, 6, 7, 8, 9]
    assert sub.group_id.tolist() == [10, 0]
    parts = b.split_tokens(torch.arange(14))
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3, 4], [5, 6, 7], [8], [9, 10, 11, 12, 13]]


def test_micro_batches_by_token_budget():
    b = sample_batch()  # lengths 5, 3, 1, 5
    assert b.micro_batches(8) == [[0, 1], [2, 3]]
    assert b.micro_batches(4) == [[0], [1, 2], [3]]  # over-long sequences get their own micro-batch
    with pytest.raises(ValueError, match="max_tokens must be > 0"):
        b.micro_batches(0)


def test_to_keeps_dtypes():
    b = sample_batch().to("cpu")
    assert b.cu_seqlens.dtype == torch.int32 and b.loss_mask.dtype == torch.bool


def test_empty_batch():
    b = PackedBatch.from_sequences([])
    assert b.num_seqs == 0 and b.num_tokens == 0 and b.old_logp is None


@pytest.mark.parametrize("seqs, message", [
    ([SequenceSample([], [1], 1.0, 0)], r"sequences\[0\]\.prompt_ids is empty"),
    ([SequenceSample([1], [2.5], 1.0, 0)], r"sequences\[0\]\.response_ids must be a 1-D sequence of integer"),
    ([SequenceSample([1], [2], 1.0, 0, old_logp=[-1.0]), SequenceSample([1], [2, 3], 1.0, 0, old_logp=[-1.0])],
     r"sequences\[1\]\.old_logp has 1 values; expected one per response token \(2\)"),
    ([SequenceSample([1], [2], 1.0, 3), SequenceSample([1], [2], 1.0, 3, stream=1)],
     r"group ids \[3\] appear in both the base and the correction stream"),
    ([SequenceSample([1], [2], 1.0, 0), SequenceSample([1], [2], 1.0, 1, stream=2)], "stream of sequence 1 is 2"),
    ([SequenceSample([1], [2], float("inf"), 0)], "reward of sequence 0 is not finite"),
    ([SequenceSample([1], [2], 1.0, 0, old_logp=[float("nan")])], "old_logp of sequence 0 is not finite"),
])
def test_from_sequences_errors(seqs: list, message: str):
    with pytest.raises(ValueError, match=message):
        PackedBatch.from_sequences(seqs)


def corrupt(**changes) -> PackedBatch:
    return replace(sample_batch(), **changes)


@pytest.mark.parametrize("make, message", [
    (lambda b: dict(cu_seqlens=b.cu_seqlens.long()), "cu_seqlens must be a 1-D int32 tensor"),
    (lambda b: dict(cu_seqlens=torch.tensor([0, 5, 8, 9, 13], dtype=torch.int32)), "must start at 0 and end at"),
    (lambda b: dict(cu_seqlens=torch.tensor([0, 5, 5, 9, 14], dtype=torch.int32)), "sequence 1 has length 0"),
    (lambda b: dict(input_ids=b.input_ids.int()), "input_ids must be a 1-D torch.int64 tensor of length 14"),
    (lambda b: dict(loss_mask=b.loss_mask.float()), "loss_mask must be a 1-D torch.bool tensor"),
    (lambda b: dict(reward=b.reward[:3]), "reward must be a 1-D torch.float32 tensor of length 4"),
    (lambda b: dict(old_logp=b.old_logp.double()), "old_logp must be a 1-D torch.float32 tensor"),
    (lambda b: dict(prompt_len=torch.tensor([2, 2, 2, 3])), "prompt_len of sequence 2 is 2; must be in \\[1, 1\\]"),
    (lambda b: dict(position_ids=b.position_ids.roll(1)), "position_ids of sequence 0 do not restart"),
    (lambda b: dict(targets=torch.where(torch.arange(14) == 6, 0, b.targets)), "targets of sequence 1 are not"),
    (lambda b: dict(loss_mask=b.loss_mask | (torch.arange(14) == 9)), "loss_mask of sequence 3 covers a position"),
])
def test_validate_errors(make, message: str):
    b = corrupt(**make(sample_batch()))
    with pytest.raises(ValueError, match=message):
        b.validate()
