"""Shared builders for the algorithm tests: fake step results, a character tokenizer."""

from __future__ import annotations

import random
from typing import Sequence

from cipo.algorithm import PromptResult, Trajectory


def char_encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def char_decode(ids: Sequence[int]) -> str:
    return "".join(chr(i) for i in ids)


def make_result(pid, num_correct: int, num_total: int = 8, prompt: str | None = None) -> PromptResult:
    """A prompt whose first ``num_correct`` trajectories are correct."""
    trajs = [Trajectory(correct=i < num_correct, text=f"attempt {i} of {pid}: {'ok' if i < num_correct else 'no'}")
             for i in range(num_total)]
    return PromptResult(prompt_id=pid, prompt=prompt or f"Problem {pid}: compute something.", trajectories=trajs)


def random_results(rng: random.Random, num_prompts: int, group: int = 8, id_offset: int = 0) -> list[PromptResult]:
    """Prompts with a spread of pass rates: some all-wrong, some all-correct, the rest mixed."""
    out = []
    for i in range(num_prompts):
        difficulty = rng.random()
        correct = sum(rng.random() > difficulty for _ in range(group))
        out.append(make_result(id_offset + i, correct, group))
    return out
