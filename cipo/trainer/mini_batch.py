"""The step's data split for the optimizer: mini-batches (verl's ``ppo_mini_batch_size``), their share per
data-parallel rank (whole groups, balanced by tokens) and the global per-stream normalisers that make micro-batch
and rank losses add up to the mini-batch's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..packing import BASE_STREAM, CORRECTION_STREAM, PackedBatch
from .distributed import balanced_partition, shard_bounds


@dataclass
class MiniBatch:
    """This rank's part of one mini-batch, ready for optimizer steps."""

    local: PackedBatch  # this rank's sequences of the mini-batch
    advantages: torch.Tensor  # [S_local]
    micro: list[Optional[list[int]]]  # rows of ``local`` per micro-batch; None pads to the ranks' largest count
    normalizers: tuple[Optional[float], Optional[float]]  # the mini-batch's global per-stream counts


def mini_batch_rows(batch: PackedBatch, mini_batch_size: Optional[int]) -> list[list[int]]:
    """The rows of each mini-batch of a step, in batch order (the same on every rank).

    ``mini_batch_size`` counts base groups (verl's ``ppo_mini_batch_size``: prompts, each with its responses).
    The base groups, in batch order, fill ``k = base groups / mini_batch_size`` consecutive mini-batches; the
    correction groups are dealt over the same ``k`` mini-batches in order, as evenly as whole groups allow (the
    first ``C mod k`` get one more). So every optimizer step sees both streams in the step's proportion and
    optimises the same joint objective ``L_base + λ·L_corr``, and no group is split (its advantages and a
    shared prompt stay together). ``None``, or a size equal to the base group count, gives one mini-batch: the
    whole step.

    Raises:
        ValueError: ``mini_batch_size`` < 1, or not dividing the number of base groups.
    """
    rows = list(range(batch.num_seqs))
    if mini_batch_size is None:
        return [rows]
    groups = batch.group_id.tolist()
    streams = batch.stream.tolist()
    base = list(dict.fromkeys(g for g, s in zip(groups, streams) if s == BASE_STREAM))
    corr = list(dict.fromkeys(g for g, s in zip(groups, streams) if s == CORRECTION_STREAM))
    if mini_batch_size < 1 or not base or len(base) % mini_batch_size:
        raise ValueError(f"actor.ppo_mini_batch_size={mini_batch_size} must be >= 1 and divide the step's "
                         f"{len(base)} base groups (algorithm.train_batch_size); set it to a divisor of that, or "
                         "null for one update per batch")
    count = len(base) // mini_batch_size
    if count == 1:
        return [rows]
    which = {group: index // mini_batch_size for index, group in enumerate(base)}
    for j in range(count):
        start, end = shard_bounds(len(corr), count, j)
        which.update({group: j for group in corr[start:end]})
    return [[row for row in rows if which[groups[row]] == j] for j in range(count)]


def partition_rows(batch: PackedBatch, rows: Sequence[int], world_size: int) -> list[list[int]]:
    """``rows`` split over ``world_size`` ranks by whole groups, balanced by tokens (:func:`balanced_partition`,
    deterministic); each rank's rows keep batch order. With ``rows`` the whole step this is the step's split."""
    groups = batch.group_id.tolist()
    lengths = batch.seq_lens.tolist()
    tokens: dict[int, int] = {}
    for row in rows:
        tokens[groups[row]] = tokens.get(groups[row], 0) + lengths[row]
    ids = sorted(tokens)
    parts = [{ids[i] for i in part} for part in balanced_partition([tokens[g] for g in ids], world_size)]
    return [[row for row in rows if groups[row] in part] for part in parts]


def stream_normalizers(batch: PackedBatch, mode: str) -> tuple[Optional[float], Optional[float]]:
    """Global per-stream denominators for micro-batched mean aggregation (None for the sum modes)."""
    def positive(count: float) -> Optional[float]:
        return count if count > 0 else None  # an empty stream contributes exactly 0 without a normaliser

    if mode == "token-mean":
        return (positive(float(batch.num_loss_tokens(BASE_STREAM))),
                positive(float(batch.num_loss_tokens(CORRECTION_STREAM))))
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        counts = torch.zeros(batch.num_seqs, device=batch.device).index_add_(
            0, batch.seq_index(), batch.loss_mask.float())
        present = counts > 0
        return (positive(float((present & (batch.stream == BASE_STREAM)).sum())),
                positive(float((present & (batch.stream == CORRECTION_STREAM)).sum())))
    return None, None


