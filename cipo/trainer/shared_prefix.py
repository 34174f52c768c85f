"""Shared-prefix packing: a prompt shared by several sequences is encoded once, and each response attends to it.

A step holds groups of sequences with the same prompt: the ``rollout.n`` responses of a base prompt, and the
``correction_rollouts`` refinements of a correction prompt (the problem + a failed attempt, possibly thousands of
tokens). The plain packed layout (docs/DESIGN.md §3) repeats that prompt once per sequence. Here the *forward stream*
holds each distinct prompt once, followed by the responses of every sequence that has it::

    batch (packed):   [P1 r1a] [P1 r1b] [P1 r1c] [P2 r2a]
    forward stream:   [P1 r1a r1b r1c] [P2 r2a]
    position_ids:      0..p1-1, p1.., p1.., p1..   0..p2-1, p2..

Each response's ``position_ids`` continue after its prefix, and the attention mask lets a response token see its
prefix and the earlier tokens of its *own* response only (causal within the prefix; responses never see each
other; segments never see each other). A causal decoder's hidden state at a position depends only on the tokens it
attends to and on their positions, so every hidden state of the forward stream equals the one at the same token of
the plain packed batch — in exact arithmetic; in floating point up to the summation order of the attention.

The loss needs, per sequence, the hidden states of the positions whose target is a response token: the last prompt
token (it predicts the first response token) and every response token but the last. :class:`SharedPrefixLayout`
therefore also builds a *loss view*: a :class:`~cipo.packing.PackedBatch` whose sequence ``s`` is ``[last prompt
token of s] + response of s`` with the original targets, loss mask, log-probs, rewards, groups and streams, and the
rows of the forward stream that hold its hidden states. ``fused_linear_policy_loss`` (or ``linear_logprob``) on the
gathered hidden states and the loss view computes exactly what it computes on the plain batch: the same rows, the
same per-sequence aggregation — the loss never needs the prompt rows (their ``loss_mask`` is False).

Which sequences share: those whose prompt token ids are *identical* (compared exactly, whatever their
``prefix_id``, which stays a hint). A sequence whose prompt is unique is a group of one (no saving, same maths).

Attention, by ``config._attn_implementation`` of the HF model:

* ``sdpa`` / ``eager`` — an explicit ``[1, 1, L, L]`` mask (boolean for sdpa, additive float for eager), passed to
  the decoder as a prepared 4-D mask, which transformers uses as-is. This is the CPU path the tests run. Its mask
  is quadratic in the forward stream's length ``L``, as the mask transformers itself builds for a plain packed batch
  under sdpa/eager is in ``N`` (the plain stream's length).
* ``flex_attention`` — a ``BlockMask`` from the same rule (``mask_mod``), built blockwise on CUDA (``_compile``),
  so memory stays ``O((L/128)²)`` and fully masked blocks are skipped. This is the GPU path. On CPU its forward runs
  (compiled by inductor, tested against sdpa) but torch has no flex_attention backward on CPU, so its training step
  has not been run here.
* ``flash_attention_2`` — not supported: flash-attn varlen is block-diagonal causal per ``cu_seqlens`` and cannot
  express "see the prefix, not the sibling responses" in one call (it would need a prefix call and a suffix call
  merged by their log-sum-exps). :func:`check_model` raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..packing import PackedBatch

SUPPORTED_ATTENTION = ("sdpa", "eager", "flex_attention")


def _prompt_keys(batch: PackedBatch) -> list[bytes]:
    """One hashable key per sequence: the bytes of its prompt ids (equal keys ⇔ identical prompts)."""
    ids = batch.input_ids.detach().cpu().numpy()
    cu = batch.cu_seqlens.tolist()
    plens = batch.prompt_len.tolist()
    return [ids[cu[s]:cu[s] + plens[s]].tobytes() for s in range(batch.num_seqs)]


def shared_prefix_micro_batches(batch: PackedBatch, max_tokens: int) -> list[list[int]]:
    """Greedy split of the sequences, in order, into micro-batches of at most ``max_tokens`` *forward* tokens.

    Like :meth:`PackedBatch.micro_batches`, but a sequence whose prompt is already in the current micro-batch costs
    only its response: the budget counts what the shared-prefix forward processes. A sequence longer than
    ``max_tokens`` on its own gets a micro-batch of its own.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0; got {max_tokens}")
    keys = _prompt_keys(batch)
    lens = batch.seq_lens.tolist()
    plens = batch.prompt_len.tolist()
    groups: list[list[int]] = []
    current: list[int] = []
    present: set[bytes] = set()
    used = 0
    for row in range(batch.num_seqs):
        cost = lens[row] - plens[row] if keys[row] in present else lens[row]
        if current and used + cost > max_tokens:
            groups.append(current)
            current, present, used = [], set(), 0
            cost = lens[row]
        current.append(row)
        present.add(keys[row])
        used += cost
    if current:
        groups.append(current)
    return groups


@dataclass
class SharedPrefixLayout:
    """The forward stream of a batch with shared prompts, its attention rule, and the loss view.

    Forward-stream tensors, shape ``[L]`` (int64, on the batch's device): ``input_ids``, ``position_ids`` (each
    prefix from 0, each response continuing after its prefix), ``segment`` (the prefix group of each token),
    ``branch`` (-1 on prefix tokens, else the row of the sequence whose response it is).

    Loss view: ``view`` (a :class:`PackedBatch` of ``R = Σ_s (response_len_s + 1)`` tokens, sequence ``s`` being the
    last prompt token of ``s`` + its response, ``prompt_len`` 1), ``hidden_index`` ``[R]`` (the forward-stream row
    whose hidden state each view token takes) and ``batch_index`` ``[R]`` (the plain batch's token each view token
    is, for scattering per-token outputs back).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    branch: torch.Tensor
    hidden_index: torch.Tensor
    batch_index: torch.Tensor
    view: PackedBatch
    num_batch_tokens: int
    num_groups: int

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(cls, batch: PackedBatch) -> "SharedPrefixLayout":
        """The layout of ``batch``: sequences with identical prompt ids share one copy of it."""
        device = batch.device
        cu = batch.cu_seqlens.tolist()
        plens = batch.prompt_len.tolist()
        keys = _prompt_keys(batch)
        group_of: dict[bytes, int] = {}
        members: list[list[int]] = []
        for row, key in enumerate(keys):
            g = group_of.setdefault(key, len(members))
            if g == len(members):
                members.append([])
            members[g].append(row)

        src: list[torch.Tensor] = []  # plain-batch token of each forward token
        pos: list[torch.Tensor] = []
        seg: list[torch.Tensor] = []
        branch: list[torch.Tensor] = []
        last_prefix_row = [0] * len(members)  # forward row of each group's last prefix token
        response_start = [0] * batch.num_seqs  # forward row of each sequence's first response token
        length = 0
        for g, rows in enumerate(members):
            first = rows[0]
            plen = plens[first]
            src.append(torch.arange(cu[first], cu[first] + plen))
            pos.append(torch.arange(plen))
            seg.append(torch.full((plen,), g))
            branch.append(torch.full((plen,), -1))
            length += plen
            last_prefix_row[g] = length - 1
            for row in rows:
                rlen = cu[row + 1] - cu[row] - plen
                response_start[row] = length
                src.append(torch.arange(cu[row] + plen, cu[row + 1]))
                pos.append(torch.arange(plen, plen + rlen))
                seg.append(torch.full((rlen,), g))
                branch.append(torch.full((rlen,), row))
                length += rlen

        hidden_index: list[torch.Tensor] = []
        batch_index: list[torch.Tensor] = []
        view_lens: list[int] = []
        for row in range(batch.num_seqs):
            g = group_of[keys[row]]
            plen = plens[row]
            rlen = cu[row + 1] - cu[row] - plen
            hidden_index.append(torch.tensor([last_prefix_row[g]]))
            hidden_index.append(torch.arange(response_start[row], response_start[row] + rlen))
            batch_index.append(torch.arange(cu[row] + plen - 1, cu[row + 1]))
            view_lens.append(rlen + 1)

        def cat(parts: list[torch.Tensor]) -> torch.Tensor:
            return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)).to(device)

        src_t = cat(src)
        tok = cat(batch_index)
        view_cu = torch.zeros(batch.num_seqs + 1, dtype=torch.int32)
        view_cu[1:] = torch.cumsum(torch.tensor(view_lens, dtype=torch.int32), 0)
        view = PackedBatch(
            input_ids=batch.input_ids[tok],
            position_ids=cat([torch.arange(n) for n in view_lens]),
            targets=batch.targets[tok],
            loss_mask=batch.loss_mask[tok],
            cu_seqlens=view_cu.to(device),
            reward=batch.reward,
            group_id=batch.group_id,
            stream=batch.stream,
            prompt_len=torch.ones_like(batch.prompt_len),
            prefix_id=batch.prefix_id,
            old_logp=batch.old_logp[tok] if batch.old_logp is not None else None,
            ref_logp=batch.ref_logp[tok] if batch.ref_logp is not None else None,
            rollout_logp=batch.rollout_logp[tok] if batch.rollout_logp is not None else None,
        )
        return cls(input_ids=batch.input_ids[src_t], position_ids=cat(pos), segment=cat(seg), branch=cat(branch),
                   hidden_index=cat(hidden_index), batch_index=tok, view=view, num_batch_tokens=batch.num_tokens,
                   num_groups=len(members))

    # ------------------------------------------------------------------ sizes

    @property
    def num_tokens(self) -> int:
        """``L``, the tokens the forward processes (the plain batch has :attr:`num_batch_tokens`)."""
        return int(self.input_ids.numel())

    # ------------------------------------------------------------------ attention

    def allowed(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Whether forward token ``q`` may attend to forward token ``k`` (broadcasting index tensors).

        Same segment, ``k`` not after ``q`` in the stream, and ``k`` is a prefix token or in ``q``'s own response.
        The stream order puts a segment's prefix before its responses, so "not after" is causal within the prefix
        and within each response, and lets every response see its whole prefix.
        """
        bk = self.branch[k]
        return (self.segment[q] == self.segment[k]) & (k <= q) & ((bk < 0) | (bk == self.branch[q]))

    def dense_mask(self, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
        """The ``[1, 1, L, L]`` mask for transformers' sdpa (bool, True = attend) or eager (additive: 0 where
        allowed, the dtype's minimum elsewhere — eager adds the mask to the scores)."""
        idx = torch.arange(self.num_tokens, device=self.input_ids.device)
        allowed = self.allowed(idx[:, None], idx[None, :])[None, None]
        if attn_implementation == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        return allowed

    def block_mask(self):
        """A flex_attention ``BlockMask`` of the same rule (built blockwise by a compiled kernel on CUDA)."""
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q_idx, kv_idx):  # noqa: ARG001 - flex_attention's signature
            return self.allowed(q_idx, kv_idx)

        device = self.input_ids.device
        return create_block_mask(mask_mod, 1, None, self.num_tokens, self.num_tokens, device=device,
                                 _compile=device.type == "cuda")

    def attention_mask(self, model: nn.Module):
        """The mask for ``model``'s attention implementation (see :func:`check_model`)."""
        impl = check_model(model)
        if impl == "flex_attention":
            return self.block_mask()
        return self.dense_mask(impl, next(model.parameters()).dtype)

    # ------------------------------------------------------------------ forward and results

    def hidden_states(self, model: nn.Module) -> torch.Tensor:
        """``[R, H]`` final hidden states of the loss view's tokens (model dtype), from one forward of the stream."""
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        out = decoder(input_ids=self.input_ids[None], position_ids=self.position_ids[None],
                      attention_mask=self.attention_mask(model), use_cache=False)
        return out.last_hidden_state[0].index_select(0, self.hidden_index)

    def scatter_to_batch(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """A per-view-token ``[R]`` tensor placed at its plain-batch tokens: ``[N]``, ``fill`` elsewhere (the prompt
        positions, whose targets are prompt tokens: log-probs there are 0 by the packed layout's convention)."""
        out = values.new_full((self.num_batch_tokens, *values.shape[1:]), fill)
        out[self.batch_index] = values
        return out


def check_model(model: nn.Module) -> str:
    """The model's attention implementation, if shared-prefix packing supports it and its layers all attend fully.

    Raises:
        ValueError: for flash_attention_2 (or another implementation) and for sliding-window layers (the explicit
        mask would silently replace the window).
    """
    config = model.config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(f"actor.shared_prefix needs model.attn_implementation in {SUPPORTED_ATTENTION}; the model "
                         f"uses {impl!r} (flash-attn varlen cannot express a shared prefix in one call)")
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        raise ValueError("actor.shared_prefix supports full-attention layers only; this model has sliding-window "
                         f"layers (layer_types={sorted(set(layer_types))})")
    return impl

