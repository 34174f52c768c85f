"""Data parallelism as the trainer sees it: who am I, which prompts are mine, and the few collectives the step
needs (gather the step's rollouts, sum metrics, agree on a micro-batch count).

The launcher (``torchrun`` or ``deepspeed``) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address; :func:`init_distributed` joins the group through DeepSpeed (NCCL on CUDA, gloo on CPU). Without a
launcher everything here is a no-op on one rank, so the single-process trainer runs the same code.

How the ranks stay in step: generation is the only work split by prompts (rank ``r`` samples its contiguous
shard, with per-prompt seeds, so the samples equal a single process's). Its results are gathered, so every rank
holds the whole step — the pass-rate tracker, the selector, shaping and the replay controller then run on
identical inputs and take identical decisions without further communication. Training is split by whole
groups (:func:`balanced_partition`): no group straddles ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the data-parallel group (``world_size == 1``: no group, no collectives).

    With Ulysses sequence parallelism (``sp_size`` > 1) consecutive ranks form a sequence-parallel group that trains
    the same sequences: the step is split over ``dp_size = world_size / sp_size`` data-parallel ranks
    (``dp_rank = rank // sp_size``); generation is still split over every rank.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    sp_size: int = 1

    def __post_init__(self) -> None:
        if self.sp_size < 1 or self.world_size % self.sp_size:
            raise ValueError(f"actor.ulysses_sequence_parallel_size={self.sp_size} must be >= 1 and divide the "
                             f"{self.world_size} ranks of the launch")

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> tuple[int, int]:
        """``[start, end)`` of this rank's contiguous share of ``n`` items (the first ``n % world`` get one more)."""
        return shard_bounds(n, self.world_size, self.rank)

    def all_gather_object(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order (picklable objects; for step data, not tensors of the model)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """Elementwise ``sum`` or ``max`` of a list of floats over ranks (float64, so counts stay exact)."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._collective_device())
        reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
        torch.distributed.all_reduce(tensor, op=reduce_op)
        return tensor.cpu().tolist()

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def _collective_device(self) -> torch.device:
        # NCCL only reduces CUDA tensors; gloo only CPU ones.
        backend = torch.distributed.get_backend()
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank``'s contiguous share when ``n`` items are split over ``world_size`` ranks."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def launched_world_size() -> int:
    """The world size a launcher asked for (1 when the process was started directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_type: str, required: bool = False, sp_size: int = 1) -> DistContext:
    """Join the launcher's process group (once per process) and describe this rank.

    Args:
        device_type: ``"cuda"`` (NCCL, one GPU per local rank) or ``"cpu"`` (gloo).
        required: make a group even without a launcher (DeepSpeed needs one): a world of one on a free local port.
        sp_size: ranks per Ulysses sequence-parallel group (must divide the world size).

    Raises:
        StaleBuildLockError: a DeepSpeed op's build lock that DeepSpeed would wait on forever
            (:mod:`cipo.trainer.build_locks`); the message names the file to delete.
    """
    world = launched_world_size()
    if world <= 1 and not torch.distributed.is_initialized():
        if not required:
            return DistContext()
        # Without these, DeepSpeed would try to discover an MPI world (and need mpi4py).
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(key, value)
    if not torch.distributed.is_initialized():
        import deepspeed

        from .build_locks import prepare_deepspeed

        prepare_deepspeed()  # DeepSpeed's start-up would otherwise JIT-build an op and may wait on a stale lock
        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    return DistContext(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                       local_rank=local_rank, sp_size=sp_size)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def balanced_partition(sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Split items (groups, with their token counts) into ``parts`` lists of indices with near-equal totals.

    Longest-processing-time greedy: the largest item goes to the lightest part (ties: the lower part index), so
    the result is deterministic — every rank computes the same partition. Each part keeps its indices sorted.
    """
    loads = [0] * parts
    members: list[list[int]] = [[] for _ in range(parts)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        lightest = min(range(parts), key=lambda p: (loads[p], p))
        loads[lightest] += sizes[index]
        members[lightest].append(index)
    return [sorted(m) for m in members]
