"""Difficulty-aware choice of the conditioning trajectories of the correction batch.

Given the candidates (this step's base results, or the offline pool), the number of correction prompts ``B``
and the replay ratio ρ, the selector returns ``B`` picks: ``round(ρ·B)`` successful trajectories and the rest
failed ones. Preference order, for each kind separately:

1. *in band* — trajectories of prompts whose pass rate lies in ``[p_low, p_high]`` (edges included);
2. *fallback* — trajectories of all other prompts, used only once the in-band ones are exhausted.

Within a tier, prompts are visited in a seeded random order, round-robin: every prompt gives one trajectory
before any gives a second, so the batch spreads over as many prompts as the tier allows. When one kind runs
out altogether, the other kind fills the gap (``substituted=True``); when both run out the selection is
short. Every pick records why it was made, for metrics. The randomness comes from a private
``random.Random`` seeded with ``(seed, step)``: no global RNG, same inputs → same picks.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from .pass_rate import PromptId
from .template import PromptLike

IN_BAND = "in_band"
FALLBACK = "fallback"
BAND_TOLERANCE = 1e-9  # pass rates are ratios of small ints (and EMAs of them); keep the band edges inclusive


@dataclass
class Trajectory:
    """One base response: its correctness, its text (for the template) and, optionally, its token ids."""

    correct: bool
    text: str = ""
    token_ids: Optional[list[int]] = None

    def to_dict(self) -> dict[str, Any]:
        return {"correct": bool(self.correct), "text": self.text,
                "token_ids": None if self.token_ids is None else [int(t) for t in self.token_ids]}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Trajectory":
        ids = values.get("token_ids")
        return cls(correct=bool(values["correct"]), text=values.get("text", ""),
                   token_ids=None if ids is None else [int(t) for t in ids])


@dataclass
class PromptResult:
    """A prompt and its base responses of one step."""

    prompt_id: PromptId
    prompt: PromptLike
    trajectories: list[Trajectory]

    @property
    def pass_rate(self) -> float:
        """Fraction of correct trajectories (0 when there are none)."""
        n = len(self.trajectories)
        return sum(t.correct for t in self.trajectories) / n if n else 0.0

    def to_dict(self) -> dict[str, Any]:
        prompt = self.prompt if isinstance(self.prompt, str) else [dict(m) for m in self.prompt]
        return {"prompt_id": self.prompt_id, "prompt": prompt,
                "trajectories": [t.to_dict() for t in self.trajectories]}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PromptResult":
        return cls(prompt_id=values["prompt_id"], prompt=values["prompt"],
                   trajectories=[Trajectory.from_dict(t) for t in values["trajectories"]])


@dataclass(frozen=True)
class Pick:
    """One conditioning trajectory of the correction batch.

    Attributes:
        result_index: index of its :class:`PromptResult` in the candidates given to :meth:`select`.
        prompt_id: the original prompt's id.
        trajectory_index: index of the trajectory in that result.
        was_correct: the trajectory's correctness (successful picks are replays).
        reason: ``"in_band"`` (pass rate in ``[p_low, p_high]``) or ``"fallback"``.
        substituted: picked as the other kind because the requested kind ran out.
        pass_rate: the pass rate the band test used.
    """

    result_index: int
    prompt_id: PromptId
    trajectory_index: int
    was_correct: bool
    reason: str
    substituted: bool
    pass_rate: float


@dataclass
class Selection:
    """The selector's output: the picks and what was asked for."""

    picks: list[Pick]
    num_requested: int
    requested_success: int
    requested_failed: int
    counts: dict[str, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Floats for logging (``select/*``)."""
        n = len(self.picks)
        out = {f"select/{k}": float(v) for k, v in self.counts.items()}
        out["select/num_picks"] = float(n)
        out["select/shortfall"] = float(self.num_requested - n)
        out["select/rho_effective"] = (sum(p.was_correct for p in self.picks) / n) if n else 0.0
        out["select/in_band_frac"] = (sum(p.reason == IN_BAND for p in self.picks) / n) if n else 0.0
        return out


class DifficultySelector:
    """Picks conditioning trajectories, preferring prompts with pass rate in ``[p_low, p_high]``.

    Args:
        p_low, p_high: the band, edges included; ``0 ≤ p_low ≤ p_high ≤ 1``.
        seed: base seed; the picks of step ``t`` use ``random.Random(f"{seed}/{t}")``.
    """

    def __init__(self, p_low: float = 0.125, p_high: float = 0.875, seed: int = 0) -> None:
        for name, value in (("p_low", p_low), ("p_high", p_high)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"DifficultySelector.{name} must be a float in [0, 1]; got {value!r}")
        if p_low > p_high:
            raise ValueError(f"DifficultySelector.p_low must be <= p_high; got p_low={p_low}, p_high={p_high}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"DifficultySelector.seed must be an int; got {seed!r}")
        self.p_low = float(p_low)
        self.p_high = float(p_high)
        self.seed = seed

    @classmethod
    def from_config(cls, config: Any) -> "DifficultySelector":
        """From a :class:`~cipo.algorithm.config.CIPOConfig`."""
        return cls(p_low=config.p_low, p_high=config.p_high, seed=config.seed)

    def in_band(self, pass_rate: float) -> bool:
        return self.p_low - BAND_TOLERANCE <= pass_rate <= self.p_high + BAND_TOLERANCE

    def select(self, candidates: Sequence[PromptResult], num_picks: int, rho: float, step: int,
               pass_rates: Optional[Mapping[PromptId, float]] = None) -> Selection:
        """Choose ``num_picks`` conditioning trajectories, ``round(rho · num_picks)`` of them successful.

        Args:
            candidates: prompts with their trajectories (this step's base results, or the offline pool).
            num_picks: the correction batch size B (number of correction prompts). ≥ 0.
            rho: the replay ratio, the share of successful conditioning trajectories. In [0, 1].
            step: the training step (seeds the RNG).
            pass_rates: the pass rate of each prompt id for the band test (the tracker's); a prompt missing
                here uses the fraction of correct trajectories among its candidates.

        Returns:
            A :class:`Selection`; it has fewer than ``num_picks`` picks only when the candidates hold fewer
            trajectories.
        """
        if isinstance(num_picks, bool) or not isinstance(num_picks, int) or num_picks < 0:
            raise ValueError(f"num_picks must be an int >= 0; got {num_picks!r}")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must be a float in [0, 1]; got {rho!r}")
        rng = random.Random(f"{self.seed}/{step}")
        pass_rates = pass_rates or {}
        rates = []
        for result in candidates:
            rate = pass_rates.get(result.prompt_id)
            rates.append(float(rate) if rate is not None else result.pass_rate)
        want_success = math.floor(rho * num_picks + 0.5)
        want_failed = num_picks - want_success

        # One preference-ordered list per kind; consume from the front.
        order = {kind: self._ordered(candidates, rates, kind, rng) for kind in (True, False)}
        take = {kind: min(want, len(order[kind])) for kind, want in ((True, want_success), (False, want_failed))}
        extra = {
            True: min(want_failed - take[False], len(order[True]) - take[True]),
            False: min(want_success - take[True], len(order[False]) - take[False]),
        }
        picks: list[Pick] = []
        for kind in (True, False):
            for rank, (result_index, traj_index, reason) in enumerate(order[kind][:take[kind] + extra[kind]]):
                picks.append(Pick(result_index=result_index, prompt_id=candidates[result_index].prompt_id,
                                  trajectory_index=traj_index, was_correct=kind, reason=reason,
                                  substituted=rank >= take[kind], pass_rate=rates[result_index]))
        counts = {
            "success_in_band": sum(p.was_correct and p.reason == IN_BAND for p in picks),
            "success_fallback": sum(p.was_correct and p.reason == FALLBACK for p in picks),
            "failed_in_band": sum(not p.was_correct and p.reason == IN_BAND for p in picks),
            "failed_fallback": sum(not p.was_correct and p.reason == FALLBACK for p in picks),
            "substituted": sum(p.substituted for p in picks),
            "distinct_prompts": len({p.result_index for p in picks}),
        }
        return Selection(picks=picks, num_requested=num_picks, requested_success=want_success,
                         requested_failed=want_failed, counts=counts)

    def _ordered(self, candidates: Sequence[PromptResult], rates: list[float], kind: bool, rng: random.Random
                 ) -> list[tuple[int, int, str]]:
        """All trajectories of one kind in preference order: (result index, trajectory index, reason)."""
        tiers: dict[str, list[tuple[int, list[int]]]] = {IN_BAND: [], FALLBACK: []}
        for i, result in enumerate(candidates):
            idx = [j for j, t in enumerate(result.trajectories) if bool(t.correct) == kind]
            if idx:
                rng.shuffle(idx)
                tiers[IN_BAND if self.in_band(rates[i]) else FALLBACK].append((i, idx))
        ordered: list[tuple[int, int, str]] = []
        for reason in (IN_BAND, FALLBACK):
            prompts = tiers[reason]
            rng.shuffle(prompts)
            depth = max((len(idx) for _, idx in prompts), default=0)
            for round_ in range(depth):  # round-robin: one trajectory per prompt per round
                ordered.extend((i, idx[round_], reason) for i, idx in prompts if round_ < len(idx))
        return ordered
