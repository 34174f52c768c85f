"""The rollout-engine interface shared by the vLLM and transformers implementations.

Logprob convention (both engines, tested): for every sampled token ``y_t`` the engine reports

    logprobs[k][t] = log_softmax(logits_t / T)[y_t]          (fp32, T = SamplingConfig.temperature)

i.e. the log-probability under the *temperature-scaled* distribution with no top-p / top-k truncation, which is
exactly what the trainer computes (docs/DESIGN.md §4, "Temperature"). Greedy decoding (T = 0) reports T = 1 values,
``log_softmax(logits)``. Top-p / top-k truncation renormalises the distribution over a token subset that neither
engine can undo cheaply, so asking for logprobs together with top_p < 1 or top_k > 0 is refused; set
``SamplingConfig(return_logprobs=False)`` for such sampling (e.g. evaluation).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch

FINISH_STOP = "stop"  # ended with the eos token (which is kept as the last completion token)
FINISH_LENGTH = "length"  # hit max_tokens


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled; the trainer reads ``temperature`` to score tokens the same way.

    Attributes:
        temperature: > 0 samples from softmax(logits / T); 0 is greedy.
        top_p: nucleus mass in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; -1 or 0 disables it.
        max_tokens: maximum completion length (the eos token counts).
        seed: base seed. Both engines sample prompt i of a call as if it were seeded with ``seed + i`` alone,
            independently of the other prompts in the call and of micro-batching, so a data-parallel rank that
            generates prompts [k, k + m) of a global batch with ``seed + k`` gets the completions one process
            generating the whole batch with ``seed`` gets (up to floating-point ties of the logits; the two
            engines draw different samples). The trainer should vary it per step (e.g.
            ``seed + step * 100003``). ``None`` draws from (and advances) the engine's own random state.
        return_logprobs: report sampled-token logprobs (see the module docstring for their definition).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 64
    seed: int | None = None
    return_logprobs: bool = True

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise ValueError(f"SamplingConfig.temperature must be >= 0; got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1]; got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"SamplingConfig.top_k must be an int >= -1 (-1/0 disable it); got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingConfig.max_tokens must be an int >= 1; got {self.max_tokens!r}")
        if self.return_logprobs and self.truncates:
            raise ValueError(
                "SamplingConfig: logprobs are defined as log_softmax(logits / T) without top-p/top-k truncation; "
                f"got top_p={self.top_p}, top_k={self.top_k}. Use top_p=1, top_k=-1 for RL rollouts, or set "
                "return_logprobs=False."
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def truncates(self) -> bool:
        """True when top-p or top-k removes tokens from the sampling distribution."""
        return self.top_p < 1.0 or self.top_k > 0

    @property
    def logprob_temperature(self) -> float:
        """The T the reported logprobs are computed at (1 for greedy decoding)."""
        return 1.0 if self.greedy else self.temperature

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RolloutBatch:
    """Completions of one ``generate`` call, flattened prompt-major.

    Completion ``k`` belongs to prompt ``k // n`` (``prompt_index[k]``); a group is ``slice(i * n, (i + 1) * n)``.

    Attributes:
        prompt_token_ids: ``[P]`` lists of prompt ids, as given.
        n: completions per prompt.
        token_ids: ``[P * n]`` lists of completion ids; when ``finish_reasons[k] == "stop"`` the last id is eos.
        texts: ``[P * n]`` decoded completions, special tokens (eos) skipped.
        logprobs: ``[P * n]`` lists of floats, one per completion id (empty lists if not requested).
        finish_reasons: ``[P * n]``, ``"stop"`` (eos) or ``"length"`` (max_tokens).
        sampling: the config the batch was sampled with.
    """

    prompt_token_ids: list[list[int]]
    n: int
    token_ids: list[list[int]]
    texts: list[str]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    sampling: SamplingConfig
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        total = len(self.prompt_token_ids) * self.n
        for name in ("token_ids", "texts", "logprobs", "finish_reasons"):
            if len(getattr(self, name)) != total:
                raise ValueError(f"RolloutBatch.{name} has {len(getattr(self, name))} entries, expected {total}")

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def prompt_index(self) -> list[int]:
        """``[P * n]`` index of each completion's prompt."""
        return [k // self.n for k in range(len(self.token_ids))]

    def group(self, i: int) -> slice:
        """Slice of prompt ``i``'s completions in the flat lists."""
        return slice(i * self.n, (i + 1) * self.n)


def validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    """Check prompts are non-empty lists of in-range ints; return them as plain lists."""
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in ids if t < 0 or t >= vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
        out.append(ids)
    return out


class RolloutEngine(abc.ABC):
    """Samples completions from the current policy weights and accepts weight updates in place."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig) -> RolloutBatch:
        """Sample ``n`` completions for each prompt (token ids, no padding). Returns a prompt-major batch."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy policy weights (HF parameter names, e.g. ``model.layers.0.self_attn.q_proj.weight``) into the
        engine. Affects every later ``generate``; a subset of the parameters may be passed."""

    def sleep(self) -> None:  # noqa: B027 - optional hook
        """Release accelerator memory until the next ``update_weights``/``generate``/``wake_up`` (optional).

        Meant for a trainer that shares the device with the engine: call it after generating, before the
        training step. Engines without such support (and every engine on CPU) treat it as a no-op."""

    def wake_up(self) -> None:  # noqa: B027 - optional hook
        """Undo ``sleep`` (optional; ``update_weights`` and ``generate`` wake the engine themselves)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine resources (optional)."""
