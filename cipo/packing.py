"""The packed layout of a training step: base + correction sequences in one flat token stream (docs/DESIGN.md §3).

Conventions (every consumer relies on them):

* Sequence ``s`` occupies tokens ``cu_seqlens[s] : cu_seqlens[s+1]`` (int32, flash-attn's convention) and is
  ``prompt_ids + response_ids``. ``position_ids`` restart at 0 for each sequence.
* Position ``t`` predicts ``targets[t]``, the next token of the same sequence; the last position of each
  sequence has no next token and holds ``IGNORE_INDEX`` (-100).
* ``loss_mask[t]`` is True where ``targets[t]`` is a response token, i.e. for the positions
  ``start + prompt_len − 1 … end − 2`` of each sequence; token-level log-probs (``old_logp``, ``ref_logp``,
  ``rollout_logp``) are aligned with ``targets`` and are 0 outside the mask.
* ``stream`` is 0 for the base (GRPO) stream and 1 for the correction stream; group ids never appear in
  both streams.
* ``prefix_id`` marks sequences whose prompts are identical (the prompt + failed trajectory shared by the M
  rollouts of one correction prompt); -1 means no shared prefix. It is a hint for shared-prefix packing,
  never needed for correctness.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence, Union

import torch

IGNORE_INDEX = -100
BASE_STREAM = 0
CORRECTION_STREAM = 1

TokenIds = Union[Sequence[int], torch.Tensor]
TokenValues = Union[Sequence[float], torch.Tensor]


@dataclass
class SequenceSample:
    """One prompt + response, the unit from which a :class:`PackedBatch` is built.

    ``old_logp``, ``ref_logp`` and ``rollout_logp``, when given, hold one value per *response* token.
    """

    prompt_ids: TokenIds
    response_ids: TokenIds
    reward: float
    group_id: int
    stream: int = BASE_STREAM
    old_logp: Optional[TokenValues] = None
    ref_logp: Optional[TokenValues] = None
    rollout_logp: Optional[TokenValues] = None
    prefix_id: int = -1


_TOKEN_LOGP_FIELDS = ("old_logp", "ref_logp", "rollout_logp")


@dataclass
class PackedBatch:
    """Base + correction sequences packed without padding.

    Token tensors, shape ``[N]``: ``input_ids``, ``position_ids``, ``targets`` (int64), ``loss_mask`` (bool),
    ``old_logp``, ``ref_logp``, ``rollout_logp`` (float32, optional). Boundaries: ``cu_seqlens`` ``[S+1]``
    int32. Per-sequence tensors, shape ``[S]``: ``reward`` (float32), ``group_id``, ``stream``,
    ``prompt_len``, ``prefix_id`` (int64).

    Build with :meth:`from_sequences`; a batch built field by field is checked by :meth:`validate`.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    reward: torch.Tensor
    group_id: torch.Tensor
    stream: torch.Tensor
    prompt_len: torch.Tensor
    prefix_id: torch.Tensor
    old_logp: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None
    rollout_logp: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_sequences(cls, sequences: Sequence[SequenceSample], device: Union[str, torch.device] = "cpu"
                       ) -> "PackedBatch":
        """Pack ``sequences`` in order. A token-level log-prob field is kept only if every sequence has it.

        Raises:
            ValueError: naming the sequence (row) and field of the first bad input.
        """
        ids: list[torch.Tensor] = []
        prompt_lens, seq_lens = [], []
        for row, seq in enumerate(sequences):
            prompt = _as_ids(seq.prompt_ids, f"sequences[{row}].prompt_ids")
            response = _as_ids(seq.response_ids, f"sequences[{row}].response_ids")
            if prompt.numel() == 0:
                raise ValueError(f"sequences[{row}].prompt_ids is empty; a sequence needs at least one prompt token")
            ids.append(torch.cat([prompt, response]))
            prompt_lens.append(prompt.numel())
            seq_lens.append(prompt.numel() + response.numel())

        num_tokens = sum(seq_lens)
        cu = [0]
        for length in seq_lens:
            cu.append(cu[-1] + length)
        input_ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
        position_ids = torch.cat([torch.arange(n) for n in seq_lens]) if ids else torch.zeros(0, dtype=torch.long)
        targets = torch.full((num_tokens,), IGNORE_INDEX, dtype=torch.long)
        loss_mask = torch.zeros(num_tokens, dtype=torch.bool)
        token_logp = {name: torch.zeros(num_tokens, dtype=torch.float32) for name in _TOKEN_LOGP_FIELDS}
        have = {name: all(getattr(s, name) is not None for s in sequences) and len(sequences) > 0
                for name in _TOKEN_LOGP_FIELDS}
        for row, seq in enumerate(sequences):
            start, end, plen = cu[row], cu[row + 1], prompt_lens[row]
            targets[start:end - 1] = input_ids[start + 1:end]
            loss_mask[start + plen - 1:end - 1] = True
            num_response = end - start - plen
            for name in _TOKEN_LOGP_FIELDS:
                values = getattr(seq, name)
                if not have[name]:
                    continue
                values = torch.as_tensor(values, dtype=torch.float32).flatten()
                if values.numel() != num_response:
                    raise ValueError(f"sequences[{row}].{name} has {values.numel()} values; expected one per "
                                     f"response token ({num_response})")
                token_logp[name][start + plen - 1:end - 1] = values

        def per_seq(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype)

        batch = cls(
            input_ids=input_ids,
            position_ids=position_ids,
            targets=targets,
            loss_mask=loss_mask,
            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
            reward=per_seq([float(s.reward) for s in sequences], torch.float32),
            group_id=per_seq([int(s.group_id) for s in sequences], torch.long),
            stream=per_seq([int(s.stream) for s in sequences], torch.long),
            prompt_len=per_seq(prompt_lens, torch.long),
            prefix_id=per_seq([int(s.prefix_id) for s in sequences], torch.long),
            **{name: (token_logp[name] if have[name] else None) for name in _TOKEN_LOGP_FIELDS},
        )
        batch.validate()
        return batch.to(device)

    # ------------------------------------------------------------------ shape helpers

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def seq_lens(self) -> torch.Tensor:
        """Length of every sequence, ``[S]`` int64."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    @property
    def max_seqlen(self) -> int:
        return int(self.seq_lens.max()) if self.num_seqs else 0

    def seq_index(self) -> torch.Tensor:
        """The sequence each token belongs to, ``[N]`` int64."""
        return torch.repeat_interleave(torch.arange(self.num_seqs, device=self.device), self.seq_lens)

    def token_stream(self) -> torch.Tensor:
        """The stream (0 base, 1 correction) of each token, ``[N]`` int64."""
        return self.stream[self.seq_index()]

    def num_loss_tokens(self, stream: Optional[int] = None) -> int:
        """Number of tokens in the loss, for one stream or for both."""
        mask = self.loss_mask if stream is None else self.loss_mask & (self.token_stream() == stream)
        return int(mask.sum())

    # ------------------------------------------------------------------ moving, slicing, unpacking

    def to(self, device: Union[str, torch.device]) -> "PackedBatch":
        """A copy with every tensor on ``device`` (dtypes unchanged)."""
        moved = {f.name: (getattr(self, f.name).to(device) if getattr(self, f.name) is not None else None)
                 for f in fields(self)}
        return replace(self, **moved)

    def split_tokens(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Views of a ``[N, ...]`` tensor, one per sequence."""
        if values.shape[0] != self.num_tokens:
            raise ValueError(f"values has {values.shape[0]} rows; the batch has {self.num_tokens} tokens")
        return list(torch.split(values, self.seq_lens.tolist()))

    def unpack(self) -> list[SequenceSample]:
        """The sequences back, as views into this batch's tensors (inverse of :meth:`from_sequences`)."""
        out = []
        cu = self.cu_seqlens.tolist()
        plens = self.prompt_len.tolist()
        for row in range(self.num_seqs):
            start, end, plen = cu[row], cu[row + 1], plens[row]
            logps = {name: (getattr(self, name)[start + plen - 1:end - 1] if getattr(self, name) is not None
                            else None) for name in _TOKEN_LOGP_FIELDS}
            out.append(SequenceSample(
                prompt_ids=self.input_ids[start:start + plen],
                response_ids=self.input_ids[start + plen:end],
                reward=float(self.reward[row]),
                group_id=int(self.group_id[row]),
                stream=int(self.stream[row]),
                prefix_id=int(self.prefix_id[row]),
                **logps,
            ))
        return out

    def token_index(self, rows: Sequence[int]) -> torch.Tensor:
        """``[n]`` int64 (on the batch's device): the token positions of sequences ``rows``, in that order."""
        cu = self.cu_seqlens.tolist()
        parts = [torch.arange(cu[r], cu[r + 1]) for r in rows]
        return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)).to(self.device)

    def select(self, rows: Sequence[int]) -> "PackedBatch":
        """A new batch of the given sequences, in the given order (micro-batching on sequence boundaries)."""
        cu = self.cu_seqlens.tolist()
        tok = self.token_index(rows)
        seq = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        new_cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
        new_cu[1:] = torch.cumsum(torch.tensor([cu[r + 1] - cu[r] for r in rows], dtype=torch.int32), 0)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = None
            elif f.name == "cu_seqlens":
                out[f.name] = new_cu.to(self.device)
            elif value.shape[0] == self.num_tokens and f.name in _TOKEN_FIELDS:
                out[f.name] = value[tok]
            else:
                out[f.name] = value[seq]
        return PackedBatch(**out)

    def micro_batches(self, max_tokens: int) -> list[list[int]]:
        """Greedy split of the sequences, in order, into groups of at most ``max_tokens`` tokens.

        A sequence longer than ``max_tokens`` gets a micro-batch of its own.
        """
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0; got {max_tokens}")
        groups: list[list[int]] = []
        current: list[int] = []
        used = 0
        for row, length in enumerate(self.seq_lens.tolist()):
            if current and used + length > max_tokens:
                groups.append(current)
                current, used = [], 0
            current.append(row)
            used += length
        if current:
            groups.append(current)
        return groups

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Check dtypes, shapes and the layout's invariants; raise ValueError naming field and row."""
        n = self.input_ids.numel()
        for name in ("input_ids", "position_ids", "targets"):
            _check_1d(getattr(self, name), name, torch.long, n)
        _check_1d(self.loss_mask, "loss_mask", torch.bool, n)
        cu = self.cu_seqlens
        if cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 1:
            raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [S+1]; got shape {tuple(cu.shape)} "
                             f"dtype {cu.dtype}")
        if int(cu[0]) != 0 or int(cu[-1]) != n:
            raise ValueError(f"cu_seqlens must start at 0 and end at the token count {n}; got "
                             f"{int(cu[0])}..{int(cu[-1])}")
        lens = cu[1:] - cu[:-1]
        if bool((lens <= 0).any()):
            row = int(torch.nonzero(lens <= 0)[0])
            raise ValueError(f"cu_seqlens must be strictly increasing; sequence {row} has length {int(lens[row])}")
        s = self.num_seqs
        _check_1d(self.reward, "reward", torch.float32, s)
        for name in ("group_id", "stream", "prompt_len", "prefix_id"):
            _check_1d(getattr(self, name), name, torch.long, s)
        for name in _TOKEN_LOGP_FIELDS:
            if getattr(self, name) is not None:
                _check_1d(getattr(self, name), name, torch.float32, n)
        if s == 0:
            return
        bad = ~torch.isfinite(self.reward)
        if bool(bad.any()):
            raise ValueError(f"reward of sequence {int(torch.nonzero(bad)[0])} is not finite")
        bad = (self.stream != BASE_STREAM) & (self.stream != CORRECTION_STREAM)
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0])
            raise ValueError(f"stream of sequence {row} is {int(self.stream[row])}; must be 0 (base) or "
                             "1 (correction)")
        bad = (self.prompt_len < 1) | (self.prompt_len > lens.long())
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0])
            raise ValueError(f"prompt_len of sequence {row} is {int(self.prompt_len[row])}; must be in "
                             f"[1, {int(lens[row])}]")
        base_groups = set(self.group_id[self.stream == BASE_STREAM].tolist())
        corr_groups = set(self.group_id[self.stream == CORRECTION_STREAM].tolist())
        shared = sorted(base_groups & corr_groups)
        if shared:
            raise ValueError(f"group ids {shared[:5]} appear in both the base and the correction stream; "
                             "the streams' group ids must not collide")

        seq_idx = self.seq_index()
        starts = self.cu_seqlens.long()[:-1]
        offset = torch.arange(n, device=self.device) - starts[seq_idx]
        bad = self.position_ids != offset
        if bool(bad.any()):
            row = int(seq_idx[torch.nonzero(bad)[0]])
            raise ValueError(f"position_ids of sequence {row} do not restart at 0 and count up by 1")
        is_last = offset == (lens.long()[seq_idx] - 1)
        expected = torch.cat([self.input_ids[1:], self.input_ids.new_full((1,), IGNORE_INDEX)])
        expected[is_last] = IGNORE_INDEX
        bad = self.targets != expected
        if bool(bad.any()):
            row = int(seq_idx[torch.nonzero(bad)[0]])
            raise ValueError(f"targets of sequence {row} are not the next input ids (with {IGNORE_INDEX} at "
                             "the sequence's last position)")
        in_response = (offset >= self.prompt_len[seq_idx] - 1) & ~is_last
        bad = self.loss_mask & ~in_response
        if bool(bad.any()):
            row = int(seq_idx[torch.nonzero(bad)[0]])
            raise ValueError(f"loss_mask of sequence {row} covers a position whose target is not a response "
                             "token")
        for name in _TOKEN_LOGP_FIELDS:
            values = getattr(self, name)
            if values is None:
                continue
            bad = self.loss_mask & ~torch.isfinite(values)
            if bool(bad.any()):
                row = int(seq_idx[torch.nonzero(bad)[0]])
                raise ValueError(f"{name} of sequence {row} is not finite on a loss token")


_TOKEN_FIELDS = frozenset({"input_ids", "position_ids", "targets", "loss_mask", *_TOKEN_LOGP_FIELDS})


def _as_ids(values: TokenIds, name: str) -> torch.Tensor:
    ids = torch.as_tensor(values)
    if ids.dim() != 1 or (ids.numel() and ids.is_floating_point()):
        raise ValueError(f"{name} must be a 1-D sequence of integer token ids; got shape {tuple(ids.shape)} "
                         f"dtype {ids.dtype}")
    return ids.to(torch.long).cpu()


def _check_1d(t: torch.Tensor, name: str, dtype: torch.dtype, length: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != dtype or t.numel() != length:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        got_dtype = t.dtype if isinstance(t, torch.Tensor) else None
        raise ValueError(f"{name} must be a 1-D {dtype} tensor of length {length}; got shape {shape} "
                         f"dtype {got_dtype}")

