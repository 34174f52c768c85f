"""The rollout session: the prompt codec, the engine and sampling built from a run's config, and sample-and-score —
seeded so that neither the chunking nor a split over ranks changes a sample — with a scripted engine (no model),
plus one real HF engine run."""

from __future__ import annotations

import pytest
import torch

from cipo.algorithm import CorrectionTemplate, correction_prompt_ids
from cipo.data import synthetic
from cipo.data.dataset import chat_prompt_ids
from cipo.models.tiny import build_tiny_tokenizer
from cipo.rewards.router import RewardScorer
from cipo.rollout import RolloutBatch, SamplingConfig
from cipo.rollout.session import (
    PromptCodec,
    RolloutSession,
    engine_from_config,
    sample_and_score,
    sampling_from_config,
)
from cipo.trainer.config import load_config


class SeedEngine:
    """Answers prompt ``i`` of a call, sample ``j``, with ``"<seed + i>/<j>/<prompt length>"``: what a seeded engine
    depends on, written out. Records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []  # (prompts, seed) per generate call

    def generate(self, prompts, n, sampling):
        self.calls.append((len(prompts), sampling.seed))
        base = -1 if sampling.seed is None else sampling.seed  # unseeded: the engine's own random state
        texts = [f"{base + i}/{j}/{len(p)}" for i, p in enumerate(prompts) for j in range(n)]
        count = len(texts)
        self.last = RolloutBatch([list(p) for p in prompts], n, [[1, 2]] * count, texts, [[-0.5, -0.5]] * count,
                                 ["stop"] * count, sampling)
        return self.last


class SeedScorer:
    """Reward: the sampled seed's parity, so a misrouted row or a shifted seed changes the scores."""

    def score(self, rows, responses):
        assert len(rows) == len(responses)
        return [float((int(text.split("/")[0]) + row["k"]) % 2) for row, text in zip(rows, responses)]


class Gathered(Exception):
    """Stops a rank at its gather, carrying the part it contributes."""


class Ranks:
    """Rank ``rank`` of ``world`` (contiguous shards as ``DistContext.shard``). With ``parts`` (every other rank's
    contribution) ``all_gather_object`` returns them all in rank order; without, it raises :class:`Gathered` with
    this rank's part."""

    def __init__(self, rank: int, world: int, parts: dict[int, object] | None = None) -> None:
        self.rank, self.world, self.parts = rank, world, parts

    @property
    def distributed(self) -> bool:
        return True

    def shard(self, n: int) -> tuple[int, int]:
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def all_gather_object(self, obj):
        if self.parts is None:
            raise Gathered(obj)
        return [obj if r == self.rank else self.parts[r] for r in range(self.world)]


PROMPTS = [[1] * (3 + i % 4) for i in range(7)]
ROWS = [{"k": i} for i in range(7)]
SAMPLING = SamplingConfig(temperature=1.0, max_tokens=4, seed=100)


def test_one_call_returns_the_engines_batch_and_chunks_change_nothing():
    engine = SeedEngine()
    whole, scores = sample_and_score(engine, SeedScorer(), PROMPTS, ROWS, 3, SAMPLING)
    assert engine.calls == [(7, 100)] and whole is engine.last and whole.sampling == SAMPLING
    for chunk in (1, 2, 3, 7, 50):
        engine = SeedEngine()
        out, chunk_scores = sample_and_score(engine, SeedScorer(), PROMPTS, ROWS, 3, SAMPLING, chunk_prompts=chunk)
        assert [seed for _, seed in engine.calls] == [100 + start for start in range(0, 7, chunk)]
        assert (out.texts, out.token_ids, out.logprobs, chunk_scores) == (whole.texts, whole.token_ids,
                                                                          whole.logprobs, scores)
        assert out.prompt_token_ids == PROMPTS and out.n == 3 and out.sampling == SAMPLING


def test_ranks_gather_what_one_process_samples():
    whole, scores = sample_and_score(SeedEngine(), SeedScorer(), PROMPTS, ROWS, 2, SAMPLING)
    parts: dict[int, object] = {}
    for rank in (1, 2):
        with pytest.raises(Gathered) as part:
            sample_and_score(SeedEngine(), SeedScorer(), PROMPTS, ROWS, 2, SAMPLING, dist=Ranks(rank, 3),
                             chunk_prompts=2)
        parts[rank] = part.value.args[0]
    out, gathered = sample_and_score(SeedEngine(), SeedScorer(), PROMPTS, ROWS, 2, SAMPLING,
                                     dist=Ranks(0, 3, parts), chunk_prompts=2)
    assert (out.texts, out.finish_reasons, gathered) == (whole.texts, whole.finish_reasons, scores)
    assert out.num_prompts == 7 and out.sampling == SAMPLING


def test_unseeded_sampling_stays_unseeded():
    engine = SeedEngine()
    sample_and_score(engine, SeedScorer(), PROMPTS, ROWS, 1, SamplingConfig(seed=None), chunk_prompts=3)
    assert engine.calls == [(3, None), (3, None), (1, None)]


def test_codec_encodes_renders_and_counts_cuts():
    tok = build_tiny_tokenizer()
    limit = len(chat_prompt_ids(tok, "1+1?")) + 2
    codec = PromptCodec(tok, max_prompt_length=limit, truncation="left")
    assert codec.decode(codec.encode("7+5=12 \\boxed{12}")) == "7+5=12 \\boxed{12}"
    long = "What is 12+34? " * 8
    assert codec.full_ids(long) == chat_prompt_ids(tok, long)
    assert codec.prompt_ids(long) == chat_prompt_ids(tok, long)[-limit:] and codec.cut_count == 1
    assert codec.prompt_ids("1+1?") == chat_prompt_ids(tok, "1+1?") and codec.cut_count == 1
    unlimited = PromptCodec(tok)
    assert unlimited.prompt_ids(long) == chat_prompt_ids(tok, long) and unlimited.cut_count == 0


def test_session_samples_rows_and_corrections_through_the_codec():
    tok = build_tiny_tokenizer()
    codec = PromptCodec(tok, 64)
    rows = synthetic.make_dataset(3, seed=0)
    template = CorrectionTemplate(max_attempt_tokens=48)
    engine = SeedEngine()
    session = RolloutSession(engine, RewardScorer(workers=0), codec, chunk_prompts=2)
    out, scores = session.sample_rows(rows, 2, SAMPLING)
    assert out.prompt_token_ids == [codec.prompt_ids(r["prompt"]) for r in rows] and len(scores) == 6
    attempts = [(2, "7+5=12 \\boxed{12} " * 8), (0, "x")]
    corr, corr_scores = session.sample_corrections(template, rows, attempts, 3, SAMPLING)
    assert corr.prompt_token_ids == correction_prompt_ids(template, rows, attempts, codec.prompt_ids,
                                                          encode=codec.encode, decode=codec.decode)
    assert len(corr_scores) == 6


def test_engine_and_sampling_from_config(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("cipo.rollout.vllm_available", lambda: True)
    monkeypatch.setattr("cipo.rollout.make_engine", lambda kind, model_dir, **kw: seen.append((kind, kw)))
    config = load_config(None, ["trainer.seed=5", "rollout.engine=auto", "data.max_prompt_length=100",
                                "rollout.max_response_length=28", "rollout.temperature=0.75"])
    engine_from_config(config, tmp_path, torch.device("cpu"))
    engine_from_config(config, tmp_path, torch.device("cpu"), kind="vllm", seed=9, colocated=False)
    engine_from_config(config, tmp_path, torch.device("cpu"), kind="hf")
    assert seen[0] == ("vllm", {"seed": 5, "dtype": config.model.dtype, "max_model_len": 128})
    # evaluation too: a model's own limit (SmolLM2: 8192) needs more KV cache than the CPU engine has
    assert seen[1] == ("vllm", {"seed": 9, "dtype": config.model.dtype, "max_model_len": 128})
    assert seen[2] == ("hf", {"device": torch.device("cpu"), "dtype": getattr(torch, config.model.dtype)})
    train = sampling_from_config(config, 3)
    assert (train.temperature, train.max_tokens, train.seed, train.return_logprobs) == (0.75, 28, 3, True)
    evaluation = sampling_from_config(config, 4, temperature=0.5, return_logprobs=False)
    assert (evaluation.temperature, evaluation.return_logprobs) == (0.5, False)


def test_hf_engine_samples_are_chunk_independent(tiny_dir):
    from cipo.rollout import make_engine

    engine = make_engine("hf", tiny_dir)
    codec = PromptCodec(engine.tokenizer, 64)
    rows = synthetic.make_dataset(5, seed=1)
    sampling = SamplingConfig(temperature=1.0, max_tokens=8, seed=11, return_logprobs=False)
    one, one_scores = RolloutSession(engine, RewardScorer(workers=0), codec).sample_rows(rows, 2, sampling)
    two, two_scores = RolloutSession(engine, RewardScorer(workers=0), codec, chunk_prompts=2).sample_rows(
        rows, 2, sampling)
    assert one.token_ids == two.token_ids and one_scores == two_scores
