"""Per-prompt empirical pass rates from the base rollouts.

For each prompt the tracker keeps this step's pass rate ``p̂_t = (#correct) / G`` and an exponential moving
average over the steps in which the prompt was sampled, ``ema ← d · ema + (1 − d) · p̂_t`` (the first
observation sets ``ema = p̂_t``). The EMA runs over *observations*, not wall-clock steps: a prompt drawn once
per epoch keeps its last estimate in between. Its state is part of the training checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Mapping, Optional, Union

PromptId = Union[int, str]

PASS_RATE_SOURCES = ("step", "ema")


@dataclass
class PromptStats:
    """What the tracker knows about one prompt."""

    ema: float
    last_rate: float
    last_step: int
    num_observations: int
    num_samples: int
    num_correct: int


def _check_prompt_id(pid: Hashable) -> PromptId:
    if isinstance(pid, bool) or not isinstance(pid, (int, str)):
        raise ValueError(f"prompt ids must be int or str (they go into JSON checkpoints); got {pid!r}")
    return pid


class PassRateTracker:
    """Per-prompt pass rates: this step's and an EMA over the prompt's history.

    Args:
        ema_decay: d in ``ema ← d · ema + (1 − d) · p̂``; 0 keeps only the latest observation. In [0, 1).
    """

    def __init__(self, ema_decay: float = 0.5) -> None:
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"PassRateTracker.ema_decay must be a float in [0, 1); got {ema_decay!r}")
        self.ema_decay = float(ema_decay)
        self._stats: dict[PromptId, PromptStats] = {}
        self._step_rates: dict[PromptId, float] = {}
        self._step: Optional[int] = None

    def update(self, outcomes: Mapping[PromptId, Iterable[bool]], step: int) -> dict[PromptId, float]:
        """Record one step's base rollouts: ``outcomes[prompt_id]`` is the correctness of each response.

        A prompt listed twice in one step is not possible (mapping keys); a prompt with no responses raises.

        Returns:
            This step's pass rate of each prompt (also kept as :attr:`step_rates` until the next update).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0; got {step!r}")
        rates: dict[PromptId, float] = {}
        for pid, correct in outcomes.items():
            pid = _check_prompt_id(pid)
            flags = [bool(c) for c in correct]
            if not flags:
                raise ValueError(f"prompt {pid!r} has no responses; a pass rate needs at least one")
            num_correct = sum(flags)
            rate = num_correct / len(flags)
            rates[pid] = rate
            stats = self._stats.get(pid)
            if stats is None:
                self._stats[pid] = PromptStats(ema=rate, last_rate=rate, last_step=step, num_observations=1,
                                               num_samples=len(flags), num_correct=num_correct)
                continue
            stats.ema = self.ema_decay * stats.ema + (1.0 - self.ema_decay) * rate
            stats.last_rate = rate
            stats.last_step = step
            stats.num_observations += 1
            stats.num_samples += len(flags)
            stats.num_correct += num_correct
        self._step_rates = rates
        self._step = step
        return dict(rates)

    # ------------------------------------------------------------------ queries

    @property
    def step_rates(self) -> dict[PromptId, float]:
        """Pass rates of the prompts of the latest :meth:`update`."""
        return dict(self._step_rates)

    def pass_rate(self, prompt_id: PromptId, source: str = "ema") -> Optional[float]:
        """The prompt's pass rate: ``"ema"`` (history, latest step included) or ``"step"`` (latest update
        only). None when unknown (never seen, or not in the latest step for ``"step"``)."""
        if source == "step":
            return self._step_rates.get(prompt_id)
        if source == "ema":
            stats = self._stats.get(prompt_id)
            return None if stats is None else stats.ema
        raise ValueError(f"source must be one of {PASS_RATE_SOURCES}; got {source!r}")

    def pass_rates(self, source: str = "ema") -> dict[PromptId, float]:
        """All known pass rates for ``source`` (see :meth:`pass_rate`)."""
        if source == "step":
            return dict(self._step_rates)
        if source == "ema":
            return {pid: s.ema for pid, s in self._stats.items()}
        raise ValueError(f"source must be one of {PASS_RATE_SOURCES}; got {source!r}")

    def stats(self, prompt_id: PromptId) -> Optional[PromptStats]:
        return self._stats.get(prompt_id)

    def __len__(self) -> int:
        return len(self._stats)

    def metrics(self) -> dict[str, float]:
        """Floats for logging about the latest step's prompts."""
        rates = list(self._step_rates.values())
        if not rates:
            return {}
        n = len(rates)
        return {
            "pass_rate/mean": sum(rates) / n,
            "pass_rate/all_correct_frac": sum(r == 1.0 for r in rates) / n,
            "pass_rate/all_wrong_frac": sum(r == 0.0 for r in rates) / n,
            "pass_rate/tracked_prompts": float(len(self._stats)),
        }

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state. Prompts are stored as rows so int and str ids survive a JSON round trip."""
        return {
            "ema_decay": self.ema_decay,
            "step": self._step,
            "prompts": [[pid, s.ema, s.last_rate, s.last_step, s.num_observations, s.num_samples, s.num_correct]
                        for pid, s in self._stats.items()],
            "step_rates": [[pid, rate] for pid, rate in self._step_rates.items()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. The tracker's own ``ema_decay`` (from the config) applies from
        here on, so a resumed run may change it; the stored one is informational."""
        self._step = state["step"]
        self._stats = {}
        for pid, ema, last_rate, last_step, n_obs, n_samples, n_correct in state["prompts"]:
            self._stats[_check_prompt_id(pid)] = PromptStats(
                ema=float(ema), last_rate=float(last_rate), last_step=int(last_step), num_observations=int(n_obs),
                num_samples=int(n_samples), num_correct=int(n_correct))
        self._step_rates = {_check_prompt_id(pid): float(rate) for pid, rate in state["step_rates"]}
