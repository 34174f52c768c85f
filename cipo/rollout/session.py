"""One rollout session: how a policy's prompts become token ids, how its engine is built, and how prompts are
sampled and scored — the one path the trainer's step, its in-training evaluation, ``cipo eval`` and the tiny
model's warm start all take.

* :class:`PromptCodec` — the policy tokenizer's text ↔ ids (no special tokens), a row's prompt rendered with the
  chat template (a plain string is one user message) and cut to ``data.max_prompt_length`` on the side
  ``data.truncation`` names, counting the prompts it cut (:class:`PromptTruncator`); :func:`screen_prompts`
  measures a split against the limit before anything is sampled.
* :func:`engine_from_config` and :func:`sampling_from_config` — the rollout engine and the sampling parameters a
  run's ``rollout.*`` / ``model.*`` keys describe.
* :func:`sample_and_score` — ``n`` responses per prompt, verified by a reward router
  (:class:`cipo.rewards.router.RewardScorer`), seeded so that neither the chunking nor a split over ranks changes
  a sample; :class:`RolloutSession` binds an engine, a router and a codec, and samples rows and the correction
  prompts of attempts.

This module knows the run's config keys but not the trainer: it imports nothing from ``cipo.trainer`` except
the config's error type.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol, TypeVar

import torch

from ..algorithm.template import CorrectionTemplate, correction_prompt_ids
from ..data.dataset import chat_prompt_ids
from ..trainer.config_io import ConfigError
from .base import RolloutBatch, RolloutEngine, SamplingConfig

if TYPE_CHECKING:
    from ..trainer.config import TrainConfig

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------- prompt codec


def generation_suffix(tokenizer) -> list[int]:
    """The token ids the chat template appends to open the assistant turn (``add_generation_prompt``), e.g.
    ``<|im_start|>assistant\\n``: what a right-truncated prompt must keep at its end."""
    messages = [{"role": "user", "content": "x"}]
    opened = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    closed = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    if not opened.startswith(closed):
        return []
    return list(tokenizer(opened[len(closed):], add_special_tokens=False)["input_ids"])


class PromptTruncator:
    """Cuts a rendered prompt's ids to ``data.max_prompt_length`` on the side ``data.truncation`` names and counts
    the prompts it cut (``count``; the caller reports and resets it).

    ``left`` keeps the end (the assistant opening survives, the beginning of the question goes); ``right`` keeps
    the beginning and re-appends the assistant opening; ``drop`` removes over-long data rows before training
    (:func:`screen_prompts`), so only prompts built during training (correction prompts) reach it: those are
    cut on the left."""

    def __init__(self, tokenizer, limit: int, side: str) -> None:
        self.limit, self.side = limit, side
        self.suffix = generation_suffix(tokenizer) if side == "right" else []
        if len(self.suffix) >= limit:
            raise ConfigError(f"data.max_prompt_length={limit} leaves no room for a prompt next to the chat "
                              f"template's {len(self.suffix)}-token assistant opening")
        self.count = 0

    def __call__(self, ids: list[int]) -> list[int]:
        if len(ids) <= self.limit:
            return ids
        self.count += 1
        if self.side != "right":
            return ids[-self.limit:]
        k = len(self.suffix)
        body = ids[:-k] if k and ids[-k:] == self.suffix else ids
        return body[:self.limit - k] + self.suffix


class PromptCodec:
    """The policy tokenizer's side of a rollout.

    Args:
        tokenizer: an HF tokenizer with a chat template.
        max_prompt_length: cut rendered prompts to this many tokens (None: never cut).
        truncation: the side to cut (``data.truncation``: ``left``, ``right`` or ``drop``, see
            :class:`PromptTruncator`).

    Attributes:
        truncate: the :class:`PromptTruncator` (None without a limit); ``truncate.count`` is the number of
            prompts :meth:`prompt_ids` has cut so far.
    """

    def __init__(self, tokenizer, max_prompt_length: Optional[int] = None, truncation: str = "left") -> None:
        self.tokenizer = tokenizer
        self.truncate = None if max_prompt_length is None else PromptTruncator(tokenizer, max_prompt_length,
                                                                                truncation)

    @classmethod
    def from_config(cls, tokenizer, config: TrainConfig) -> PromptCodec:
        """The codec of a run: ``data.max_prompt_length`` and ``data.truncation``."""
        return cls(tokenizer, config.data.max_prompt_length, config.data.truncation)

    def encode(self, text: str) -> list[int]:
        """Text → token ids, without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids → text, without special tokens."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def full_ids(self, prompt: Any) -> list[int]:
        """A prompt (chat messages or a string) rendered with the chat template, assistant turn opened, uncut."""
        return chat_prompt_ids(self.tokenizer, prompt)

    def prompt_ids(self, prompt: Any) -> list[int]:
        """:meth:`full_ids` cut to the limit (and counted when cut)."""
        ids = self.full_ids(prompt)
        return ids if self.truncate is None else self.truncate(ids)

    @property
    def cut_count(self) -> int:
        """Prompts :meth:`prompt_ids` has cut so far."""
        return 0 if self.truncate is None else self.truncate.count


def screen_prompts(rows: list[dict], prompt_ids: Callable[[Any], list[int]], config: TrainConfig,
                   split: str) -> tuple[list[dict], dict[str, Any]]:
    """Measure every row's rendered prompt against ``data.max_prompt_length`` before training: refuse (ConfigError)
    when the share over it exceeds ``data.max_truncated_fraction``; with ``data.truncation: drop`` remove those
    rows. Returns the rows kept and a report ``{split, rows, over_limit, longest, limit, truncation}``.

    ``prompt_ids``: a row's ``prompt`` → its full (uncut) token ids (:meth:`PromptCodec.full_ids`)."""
    data = config.data
    lengths = [len(prompt_ids(row["prompt"])) for row in rows]
    over = [i for i, n in enumerate(lengths) if n > data.max_prompt_length]
    report = {"split": split, "rows": len(rows), "over_limit": len(over), "longest": max(lengths, default=0),
              "limit": data.max_prompt_length, "truncation": data.truncation}
    if not over:
        return rows, report
    share = len(over) / len(rows)
    action = {"left": "lose their beginning", "right": "lose their end", "drop": "be dropped"}[data.truncation]
    if share > data.max_truncated_fraction:
        raise ConfigError(
            f"{len(over)} of {len(rows)} {split} prompts ({share:.2%}) are longer than data.max_prompt_length="
            f"{data.max_prompt_length} tokens (longest: {report['longest']}; first: {split} row {over[0]}); with "
            f"data.truncation: {data.truncation} they would {action}. Raise data.max_prompt_length, or allow it with "
            f"data.max_truncated_fraction >= {share:.4g} (now {data.max_truncated_fraction})")
    if data.truncation == "drop":
        dropped = set(over)
        rows = [row for i, row in enumerate(rows) if i not in dropped]
        if not rows:
            raise ConfigError(f"data.truncation: drop removed every {split} prompt (all longer than "
                              f"data.max_prompt_length={data.max_prompt_length})")
    warnings.warn(f"{len(over)} of {report['rows']} {split} prompts ({share:.2%}) are longer than "
                  f"data.max_prompt_length={data.max_prompt_length} tokens and will {action} "
                  f"(data.truncation: {data.truncation})", stacklevel=2)
    return rows, report


# ------------------------------------------------------------------------------------------------- engine, sampling


def sampling_from_config(config: TrainConfig, seed: Optional[int], *, temperature: Optional[float] = None,
                         return_logprobs: bool = True) -> SamplingConfig:
    """The run's sampling parameters (``rollout.*``; ``max_tokens`` = ``rollout.max_response_length``) with
    ``seed``, at ``temperature`` when given (default ``rollout.temperature``)."""
    r = config.rollout
    return SamplingConfig(temperature=r.temperature if temperature is None else temperature, top_p=r.top_p,
                          top_k=r.top_k, max_tokens=r.max_response_length, seed=seed,
                          return_logprobs=return_logprobs)


def engine_from_config(config: TrainConfig, model_dir: Path, device: torch.device, *, kind: Optional[str] = None,
                       seed: Optional[int] = None, colocated: bool = True) -> RolloutEngine:
    """The rollout engine on ``model_dir``: ``kind`` (default ``rollout.engine``; ``auto``: vLLM when installed,
    else HF generate), ``model.dtype``, HF on ``device``.

    Args:
        seed: vLLM's engine seed (default ``trainer.seed``), used by requests without a seed of their own.
        colocated: the engine shares the device with the policy being trained: on a GPU it takes
            ``rollout.gpu_memory_utilization`` with sleep mode (``rollout.free_cache_engine``). False (evaluation,
            the engine alone on the device): vLLM's own memory sizing. Either way vLLM is sized for the run's
            longest sequence, not the model's own limit.
    """
    from . import make_engine, vllm_available  # read at call time: tests substitute cipo.rollout.make_engine

    kind = kind or config.rollout.engine
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
    if kind == "vllm":
        kwargs: dict[str, Any] = {"seed": config.trainer.seed if seed is None else seed, "dtype": config.model.dtype}
        # The longest sequence a run samples, in training and in evaluation (prompts, correction prompts included,
        # are cut to max_prompt_length): sizing vLLM for it rather than the model's own limit (8192 for SmolLM2)
        # keeps the minimum KV cache within the CPU budget (vLLM refuses to start otherwise).
        kwargs["max_model_len"] = config.data.max_prompt_length + config.rollout.max_response_length
        if colocated and device.type == "cuda":
            kwargs["gpu_memory_utilization"] = config.rollout.gpu_memory_utilization
            kwargs["sleep_mode"] = config.rollout.free_cache_engine
    else:
        kwargs = {"device": device, "dtype": getattr(torch, config.model.dtype)}
    return make_engine(kind, model_dir, **kwargs)


# ------------------------------------------------------------------------------------------------- sample and score


class Scorer(Protocol):
    """One reward per ``(row, response)`` pair, in order (:class:`cipo.rewards.router.RewardScorer`)."""

    def score(self, rows: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> list[float]: ...


class Shards(Protocol):
    """The ranks sampling splits over (:class:`cipo.trainer.distributed.DistContext`)."""

    @property
    def distributed(self) -> bool: ...

    def shard(self, n: int) -> tuple[int, int]: ...

    def all_gather_object(self, obj: T) -> list[T]: ...


def sample_and_score(engine: RolloutEngine, scorer: Scorer, prompts: Sequence[Sequence[int]],
                     rows: Sequence[Mapping[str, Any]], n: int, sampling: SamplingConfig, *,
                     dist: Optional[Shards] = None, chunk_prompts: Optional[int] = None,
                     desc: Optional[str] = None) -> tuple[RolloutBatch, list[float]]:
    """``n`` responses per prompt and their rewards (prompt-major; ``rows[i]`` verifies prompt ``i``'s responses).

    Both engines seed prompt ``i`` of a call with ``sampling.seed + i``; every call here is made with its first
    prompt's index added, so the samples do not depend on ``chunk_prompts`` (prompts per ``generate`` call; None:
    one call) nor on ``dist``: each rank samples and scores its contiguous shard and the shards are gathered, so
    every rank holds what one process sampling everything with ``sampling.seed`` gets. ``desc``: show a progress
    bar (prompts) with this label.

    Returns:
        The batch (the engine's own when one call made it, else the calls' concatenation, with ``sampling``) and
        ``[P * n]`` float rewards.
    """
    start, end = (0, len(prompts)) if dist is None else dist.shard(len(prompts))
    size = chunk_prompts or max(end - start, 1)
    bar = None
    if desc is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=end - start, desc=desc, leave=False, unit="prompt")
    parts: list[RolloutBatch] = []
    scores: list[float] = []
    for first in range(start, end, size):
        seed = None if sampling.seed is None else sampling.seed + first
        out = engine.generate(prompts[first:min(first + size, end)], n=n,
                              sampling=dataclasses.replace(sampling, seed=seed))
        scores += scorer.score([rows[first + k // n] for k in range(len(out))], out.texts)
        parts.append(out)
        if bar is not None:
            bar.update(out.num_prompts)
    if bar is not None:
        bar.close()
    local = (
        [ids for part in parts for ids in part.token_ids], [text for part in parts for text in part.texts],
        [lp for part in parts for lp in part.logprobs], [f for part in parts for f in part.finish_reasons], scores)
    if dist is not None and dist.distributed:
        gathered = dist.all_gather_object(local)
        local = tuple([x for part in gathered for x in part[i]] for i in range(5))
    elif len(parts) == 1:
        return parts[0], scores
    token_ids, texts, logprobs, finish, scores = local
    return RolloutBatch([list(p) for p in prompts], n, token_ids, texts, logprobs, finish, sampling), scores


@dataclass
class RolloutSession:
    """A policy's rollout engine, reward router and prompt codec: samples and scores rows, and the correction
    prompts of attempts, the same way for the trainer and for evaluation.

    Attributes:
        engine, scorer, codec: what samples, what verifies, what renders prompts.
        dist: the ranks sampling splits over (None: this process samples everything).
        chunk_prompts: prompts per ``generate`` call (None: one call; the samples do not depend on it).
    """

    engine: RolloutEngine
    scorer: Scorer
    codec: PromptCodec
    dist: Optional[Shards] = None
    chunk_prompts: Optional[int] = None

    def sample(self, prompts: Sequence[Sequence[int]], rows: Sequence[Mapping[str, Any]], n: int,
               sampling: SamplingConfig, desc: Optional[str] = None) -> tuple[RolloutBatch, list[float]]:
        """:func:`sample_and_score` with this session's engine, router, ranks and chunking."""
        return sample_and_score(self.engine, self.scorer, prompts, rows, n, sampling, dist=self.dist,
                                chunk_prompts=self.chunk_prompts, desc=desc)

    def sample_rows(self, rows: Sequence[Mapping[str, Any]], n: int, sampling: SamplingConfig,
                    desc: Optional[str] = None) -> tuple[RolloutBatch, list[float]]:
        """``n`` scored responses to each row's prompt (rendered and cut by the codec)."""
        return self.sample([self.codec.prompt_ids(row["prompt"]) for row in rows], rows, n, sampling, desc)

    def sample_corrections(self, template: CorrectionTemplate, rows: Sequence[Mapping[str, Any]],
                           attempts: Sequence[tuple[int, str]], n: int, sampling: SamplingConfig,
                           desc: Optional[str] = None, correct: Optional[Sequence[bool]] = None
                           ) -> tuple[RolloutBatch, list[float]]:
        """``n`` scored refinements of each ``(row index, attempt text)``: the correction prompt
        ``template(x, attempt)`` (:func:`cipo.algorithm.correction_prompt_ids`, cut by the codec), verified against
        the attempt's row. Attempt-major. ``correct``: whether each attempt verified (needed by a template that states
        the verdict)."""
        ids = correction_prompt_ids(template, rows, attempts, self.codec.prompt_ids, encode=self.codec.encode,
                                    decode=self.codec.decode, correct=correct)
        return self.sample(ids, [rows[i] for i, _ in attempts], n, sampling, desc)
