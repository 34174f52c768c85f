"""Risk-averse shaping of correction rewards.

A correction rollout is a *transition* from its conditioning trajectory's correctness to its own:
incorrect→correct (a fix), incorrect→incorrect, correct→correct (retained), correct→incorrect (a regression).
Regressions are penalised by α, in one of two places (``CIPOConfig.shaping_target``):

* ``"reward"`` — the paper's ``r − α`` on the reward, before group normalisation;
* ``"advantage"`` (default) — ``A − α`` after group normalisation.

Why the default differs from the letter of the paper: all M rollouts of a correction group share one
conditioning trajectory, so a correct-conditioned group holds only correct→correct and correct→incorrect
rollouts, i.e. the two rewards ``1`` and ``−α``. GRPO's ``(r − mean)/std`` is invariant to such an affine
change, so ``r − α`` changes nothing (up to ε), and a group that regresses on every rollout still gets zero
advantage. Shaping the advantage keeps the intent — a regression costs more than failing to fix a failure —
and gives the all-regressed group a signal. docs/ALGORITHM.md has the details.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

SHAPING_TARGETS = ("reward", "advantage")
TRANSITIONS = ("incorrect_to_correct", "incorrect_to_incorrect", "correct_to_correct", "correct_to_incorrect")

Flags = Union[Sequence[bool], torch.Tensor]
Values = Union[Sequence[float], torch.Tensor]


def _as_bools(values: Flags, name: str) -> list[bool]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D; got shape {tuple(values.shape)}")
        values = values.tolist()
    return [bool(v) for v in values]


def transition_counts(conditioning_correct: Flags, rollout_correct: Flags) -> dict[str, int]:
    """Counts of the four transitions, keyed by :data:`TRANSITIONS`."""
    cond = _as_bools(conditioning_correct, "conditioning_correct")
    out = _as_bools(rollout_correct, "rollout_correct")
    if len(cond) != len(out):
        raise ValueError(f"conditioning_correct has {len(cond)} entries, rollout_correct {len(out)}; need one "
                         "per correction rollout")
    counts = dict.fromkeys(TRANSITIONS, 0)
    for c, o in zip(cond, out):
        counts[f"{'correct' if c else 'incorrect'}_to_{'correct' if o else 'incorrect'}"] += 1
    return counts


@dataclass
class ShapingResult:
    """Shaped rewards, the regression mask and the transition counts of one step's correction rollouts."""

    rewards: list[float]
    regression: list[bool]
    counts: dict[str, int]

    @property
    def retention(self) -> Optional[float]:
        """Accuracy of correct-conditioned rollouts (None when there were none)."""
        total = self.counts["correct_to_correct"] + self.counts["correct_to_incorrect"]
        return self.counts["correct_to_correct"] / total if total else None

    @property
    def correction_rate(self) -> Optional[float]:
        """Accuracy of incorrect-conditioned rollouts (None when there were none)."""
        total = self.counts["incorrect_to_correct"] + self.counts["incorrect_to_incorrect"]
        return self.counts["incorrect_to_correct"] / total if total else None

    def metrics(self) -> dict[str, float]:
        out = {f"shaping/{k}": float(v) for k, v in self.counts.items()}
        for name in ("retention", "correction_rate"):
            value = getattr(self, name)
            if value is not None:
                out[f"shaping/{name}"] = value
        return out


def shape_rewards(conditioning_correct: Flags, rollout_correct: Flags, rewards: Values, alpha: float,
                  target: str = "reward") -> ShapingResult:
    """Risk-averse shaping of K correction rollouts.

    Args:
        conditioning_correct: ``[K]`` whether each rollout's conditioning trajectory was correct.
        rollout_correct: ``[K]`` whether each rollout's own answer is correct.
        rewards: ``[K]`` verifier rewards.
        alpha: α ≥ 0, the extra penalty of a correct→incorrect regression.
        target: ``"reward"`` returns ``r − α`` on regressions; ``"advantage"`` returns the rewards unchanged
            (apply :func:`shape_advantages` with :attr:`ShapingResult.regression` after normalisation).

    Returns:
        A :class:`ShapingResult`.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"alpha must be a float >= 0; got {alpha!r}")
    if target not in SHAPING_TARGETS:
        raise ValueError(f"target must be one of {SHAPING_TARGETS}; got {target!r}")
    counts = transition_counts(conditioning_correct, rollout_correct)
    cond = _as_bools(conditioning_correct, "conditioning_correct")
    out = _as_bools(rollout_correct, "rollout_correct")
    values = rewards.tolist() if isinstance(rewards, torch.Tensor) else list(rewards)
    if len(values) != len(cond):
        raise ValueError(f"rewards has {len(values)} entries; expected {len(cond)} (one per correction rollout)")
    regression = [c and not o for c, o in zip(cond, out)]
    penalty = float(alpha) if target == "reward" else 0.0
    shaped = [float(r) - penalty if reg else float(r) for r, reg in zip(values, regression)]
    return ShapingResult(rewards=shaped, regression=regression, counts=counts)


def shape_advantages(advantages: torch.Tensor, regression: Flags, alpha: float) -> torch.Tensor:
    """``A − α`` where ``regression`` is True (a new tensor; same shape and dtype as ``advantages [S]``)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"alpha must be a float >= 0; got {alpha!r}")
    mask = torch.as_tensor(_as_bools(regression, "regression"), dtype=torch.bool, device=advantages.device)
    if advantages.dim() != 1 or mask.shape != advantages.shape:
        raise ValueError(f"advantages must be [S] and regression must have the same length; got "
                         f"{tuple(advantages.shape)} and {tuple(mask.shape)}")
    return torch.where(mask, advantages - alpha, advantages)
