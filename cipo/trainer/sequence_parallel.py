"""Ulysses sequence parallelism in the trainer (``actor.ulysses_sequence_parallel_size``): the tokens of one
micro-batch are split over the ``sp`` ranks of a sequence-parallel group, so each rank's decoder holds ``1/sp`` of
the activations.

DeepSpeed's ``UlyssesSPAttentionHF`` (ALST, arXiv:2506.13996) does the parallel part and is used, not rewritten:
before attention an all-to-all gives every rank of the group all tokens for ``heads/sp`` heads, after it a second
all-to-all gives the token shard back; the all-gathered ``position_ids`` travel with the query. Three things are
cipo's:

* **Packed sequences stay isolated.** DeepSpeed drops the attention mask (it was built for the local shard) and
  relies on the core attention to derive it from the gathered ``position_ids``: flash-attn varlen does, sdpa and
  flex_attention do not (sdpa attends causally over the whole stream, and DeepSpeed rebuilds a plain causal
  BlockMask for flex). :func:`position_masked_attention` wraps the core attention so that, given no mask (sdpa) or
  that causal BlockMask (flex), it builds the mask :func:`attention_rule` reads off the ``position_ids``: packed
  sequences (positions restarting at 0) and shared-prefix segments (responses restarting at their prefix's
  length, :mod:`cipo.trainer.shared_prefix`) alike.
* **Only the policy is sequence-parallel.** DeepSpeed replaces the attention function of its name for the whole
  process; cipo keeps that wrapper for the attention modules of the policy it was set up for and routes every
  other model (the KL reference, the HF rollout engine) to the original function, so their full-sequence forwards
  and left-padded generation are untouched.
* **The loss sees whole sequences.** Each rank's final hidden states are all-gathered over the group (autograd-aware:
  the backward sums the gradients of every rank's loss into the shard that produced them), and the group's ranks
  split the micro-batch's *sequences* (:meth:`UlyssesSP.loss_rows`) for the fused loss, whose per-sequence
  aggregation needs every token of a sequence. The gathered ``[tokens, hidden]`` tensor is the one full-length
  activation a rank holds; the logits never exist (the fused loss).

Gradients: the loss of each rank is normalised by the mini-batch's global counts, so the step's gradient is the sum
of every rank's; DeepSpeed, configured with this module's groups (``mpu``), averages over the data-parallel size
(``world / sp``), hence the backend multiplies the loss by that size.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..packing import PackedBatch
from .distributed import balanced_partition

ULYSSES_ATTENTION = ("sdpa", "flex_attention", "flash_attention_2")


# ----------------------------------------------------------------------------------------------- the mask rule


def attention_rule(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a packed stream's ``position_ids`` say about who attends to whom: ``(document, run, run_start)``,
    each ``[L]`` int64.

    A *document* starts where the position is 0 (a packed sequence, or a shared-prefix segment); a *run* is a
    maximal stretch of consecutive positions (a sequence; in a shared-prefix segment the prefix + its first response,
    then one run per further response, each restarting at the prefix's length); ``run_start`` is the position
    each token's run starts at. Token ``q`` attends to ``k`` iff ``k`` is not after ``q``, in the same document, and
    in the same run or at a position before ``q``'s run start (the shared prefix) — see :func:`allowed`.
    """
    if position_ids.dim() != 1:
        raise ValueError(f"position_ids must be [L]; got {tuple(position_ids.shape)}")
    pos = position_ids.long()
    length = pos.numel()
    starts_run = torch.ones(length, dtype=torch.bool, device=pos.device)
    starts_run[1:] = pos[1:] != pos[:-1] + 1
    starts_document = pos == 0
    if length:
        starts_document[0] = True
    document = torch.cumsum(starts_document.long(), 0)
    run = torch.cumsum(starts_run.long(), 0) - 1
    run_start = pos[starts_run][run]
    return document, run, run_start


def allowed(rule: tuple[torch.Tensor, torch.Tensor, torch.Tensor], position_ids: torch.Tensor,
            q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Whether token ``q`` may attend to token ``k`` under ``rule`` (:func:`attention_rule`; broadcasting index
    tensors). Plain packing: causal within each sequence. Shared prefix: a response sees its prefix and its own
    earlier tokens, never a sibling response (siblings start at the prefix's length, so they are not "before")."""
    document, run, run_start = rule
    same = (document[q] == document[k]) & (k <= q)
    return same & ((run[q] == run[k]) | (position_ids[k] < run_start[q]))


def dense_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """The ``[1, 1, L, L]`` boolean mask (True: attend) of :func:`allowed` over a stream, for sdpa."""
    rule = attention_rule(position_ids)
    idx = torch.arange(position_ids.numel(), device=position_ids.device)
    return allowed(rule, position_ids.long(), idx[:, None], idx[None, :])[None, None]


def block_mask(position_ids: torch.Tensor):
    """A flex_attention ``BlockMask`` of the same rule (compiled blockwise on CUDA; no ``L × L`` tensor)."""
    from torch.nn.attention.flex_attention import create_block_mask

    rule = attention_rule(position_ids)
    pos = position_ids.long()

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ARG001 - flex_attention's signature
        return allowed(rule, pos, q_idx, kv_idx)

    length = pos.numel()
    return create_block_mask(mask_mod, 1, None, length, length, device=pos.device,
                             _compile=pos.device.type == "cuda")


def position_masked_attention(core: Callable[..., Any], implementation: str) -> Callable[..., Any]:
    """``core`` (a transformers attention function) that derives the mask from ``position_ids`` when it is handed
    none (sdpa) or a plain causal BlockMask (flex_attention) for a batch of one stream whose ``position_ids`` cover
    every query and key — what DeepSpeed's Ulysses wrapper passes after its all-to-all. Anything else (a mask it was
    given, decoding with a cache, flash-attn, which reads ``position_ids`` itself) goes to ``core`` unchanged.

    Every layer of a forward sees the same ``position_ids``, so the last stream's mask is reused: a BlockMask is
    kept (``O((L/128)²)``, and expensive to build) — best built by ``attention.prepare(position_ids)`` before the
    forward, outside the compiled region flex_attention runs in (DeepSpeed warns that compiling ``create_block_mask``
    inside it corrupts the backward); a dense ``L × L`` mask is kept only while something else still holds it (a
    weak reference), so it never outlives the step that needed it."""
    cache: dict[str, Any] = {"positions": None, "mask": lambda: None}

    def prepare(position_ids: torch.Tensor) -> None:
        """Build (flex_attention) the mask of the ``[L]`` stream the next forward attends over."""
        if implementation == "flex_attention":
            mask_for(position_ids)

    def mask_for(position_ids: torch.Tensor):
        mask = cache["mask"]() if cache["positions"] is not None and torch.equal(cache["positions"], position_ids) \
            else None
        if mask is None:
            if implementation == "flex_attention":
                mask = block_mask(position_ids)
                cache["mask"] = lambda kept=mask: kept
            else:
                mask = dense_mask(position_ids)
                cache["mask"] = weakref.ref(mask)
            cache["positions"] = position_ids.clone()
        return mask

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, *args: Any, **kwargs: Any):
        position_ids = kwargs.get("position_ids")
        whole_stream = (position_ids is not None and position_ids.dim() == 2 and position_ids.shape[0] == 1
                        and query.shape[0] == 1 and query.shape[-2] == key.shape[-2] == position_ids.shape[-1])
        if whole_stream and implementation == "sdpa" and attention_mask is None:
            attention_mask = mask_for(position_ids[0])
        elif whole_stream and implementation == "flex_attention" and _is_block_mask(attention_mask):
            attention_mask = mask_for(position_ids[0])
        return core(module, query, key, value, attention_mask, *args, **kwargs)

    attention.prepare = prepare  # type: ignore[attr-defined]
    return attention


def _is_block_mask(mask: Any) -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:  # pragma: no cover - torch without flex_attention
        return False
    return isinstance(mask, BlockMask)


# ----------------------------------------------------------------------------------------------- the group


class _GatherSequence(torch.autograd.Function):
    """All-gather of ``[l, H]`` shards along dim 0 over a group; the backward sums the gathered gradient over the
    group (every rank's loss may use any token) and returns this rank's slice."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, group: Any, rank: int, size: int) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.length = group, rank, shard.shape[0]
        parts = [torch.empty_like(shard) for _ in range(size)]
        torch.distributed.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad.narrow(0, ctx.rank * ctx.length, ctx.length), None, None, None


class UlyssesSP:
    """This rank's sequence-parallel group and the policy's sharded forward.

    Built once per process by :meth:`setup` (every rank of the world calls it, after ``deepspeed.init_distributed``):
    consecutive ranks form a group (``rank // sp`` is the data-parallel rank). ``mpu`` goes to
    ``deepspeed.initialize`` so that ZeRO reduces gradients with these groups.
    """

    def __init__(self, mpu: Any, size: int, prepare_mask: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        self.mpu = mpu
        self.size = size
        self.group = mpu.get_sequence_parallel_group()
        self.rank = mpu.get_sequence_parallel_rank()
        self.prepare_mask = prepare_mask  # the core attention's ``prepare`` (position_masked_attention)

    @classmethod
    def setup(cls, model: nn.Module, size: int) -> "UlyssesSP":
        """Register DeepSpeed's ``UlyssesSPAttentionHF`` for ``model`` (a transformers causal LM) and only for it.

        Raises:
            ValueError: an attention implementation outside :data:`ULYSSES_ATTENTION`, or heads that do not split
            over ``size`` ranks (DeepSpeed's message), or ``size`` < 2.
        """
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if size < 2:
            raise ValueError(f"UlyssesSP needs a sequence-parallel size >= 2; got {size}")
        impl = model.config._attn_implementation
        if impl not in ULYSSES_ATTENTION:
            raise ValueError(f"actor.ulysses_sequence_parallel_size > 1 needs model.attn_implementation in "
                             f"{ULYSSES_ATTENTION}; the model uses {impl!r}")
        original = ALL_ATTENTION_FUNCTIONS[impl]
        core = position_masked_attention(original, impl)
        ALL_ATTENTION_FUNCTIONS[impl] = core
        try:
            mpu = UlyssesSPAttentionHF.register_with_transformers(
                model_name_or_path=model, core_attn_implementation=impl, sequence_parallel_size=size,
                micro_batch_size=1, seq_length_is_variable=True)
            sequence_parallel = ALL_ATTENTION_FUNCTIONS[impl]
        finally:
            ALL_ATTENTION_FUNCTIONS[impl] = original
        ALL_ATTENTION_FUNCTIONS[impl] = _route_by_module(model, sequence_parallel, original)
        return cls(mpu, size, core.prepare)

    # ------------------------------------------------------------------ the forward

    def padded_length(self, length: int) -> int:
        """``length`` rounded up to a multiple of the group size (the all-to-all exchanges equal shards)."""
        return -(-length // self.size) * self.size

    def padded(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``[L]`` stream padded to :meth:`padded_length` with a separate dummy sequence (token 0, positions from
        0: a document of its own, attended by no real token) — what the group's shards add up to."""
        pad = self.padded_length(input_ids.numel()) - input_ids.numel()
        if pad:
            input_ids = torch.cat([input_ids, input_ids.new_zeros(pad)])
            position_ids = torch.cat([position_ids, torch.arange(pad, device=position_ids.device,
                                                                 dtype=position_ids.dtype)])
        return input_ids, position_ids

    def shard(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's contiguous slice of the :meth:`padded` ``[L]`` stream."""
        input_ids, position_ids = self.padded(input_ids, position_ids)
        step = input_ids.numel() // self.size
        return input_ids[self.rank * step:(self.rank + 1) * step], position_ids[self.rank * step:(self.rank + 1) * step]

    def hidden_states(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """``[L, H]`` final hidden states of a ``[L]`` stream (packed sequences, or a shared-prefix forward stream),
        computed sequence-parallel and gathered on every rank of the group (model dtype)."""
        length = input_ids.numel()
        if self.prepare_mask is not None:  # the gathered stream's mask, built before (outside) the forward
            self.prepare_mask(self.padded(input_ids, position_ids)[1])
        ids, pos = self.shard(input_ids, position_ids)
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        shard = decoder(input_ids=ids[None], position_ids=pos[None], use_cache=False).last_hidden_state[0]
        return _GatherSequence.apply(shard, self.group, self.rank, self.size)[:length]

    def local_tokens(self, length: int) -> int:
        """Tokens of a ``length``-token stream through this rank's decoder (its shard, padding included)."""
        return self.padded_length(length) // self.size

    def loss_rows(self, batch: PackedBatch) -> list[int]:
        """The sequences of ``batch`` whose loss this rank computes: the group splits them by loss tokens
        (:func:`balanced_partition`, deterministic); a rank may get none."""
        counts = torch.zeros(batch.num_seqs, dtype=torch.long, device=batch.device).index_add_(
            0, batch.seq_index(), batch.loss_mask.long())
        return balanced_partition(counts.tolist(), self.size)[self.rank]


def _route_by_module(model: nn.Module, sequence_parallel: Callable[..., Any],
                     original: Callable[..., Any]) -> Callable[..., Any]:
    """An attention function that sends ``model``'s attention modules to ``sequence_parallel`` and every other
    module to ``original`` (transformers passes the calling module first)."""
    policy_modules = {id(module) for module in model.modules()}

    def attention(module: nn.Module, *args: Any, **kwargs: Any):
        if id(module) in policy_modules:
            return sequence_parallel(module, *args, **kwargs)
        return original(module, *args, **kwargs)

    return attention


def optional_sp(model: nn.Module, size: int) -> Optional[UlyssesSP]:
    """:meth:`UlyssesSP.setup` for ``size`` > 1, else None."""
    return UlyssesSP.setup(model, size) if size > 1 else None
