"""The adaptive replay ratio ρ and the offline trajectory pool.

**Retention** of a step is the accuracy of the correction rollouts whose conditioning trajectory was correct:
``retained / total`` with ``retained = #(correct → correct)`` and ``total = #(correct → correct) +
#(correct → incorrect)``. It measures whether the policy keeps a right answer when asked to review it — the
capability that an almost-all-failures correction stream erodes.

**The rule** (:class:`ReplayController`, evaluated once per step after the correction rollouts are verified):

* a step with fewer than ``min_samples`` correct-conditioned rollouts carries no information → *hold*;
* otherwise ``level ← d · level + (1 − d) · retention`` (the first informative step sets ``level``), and the
  raw retention joins a window of the last ``window`` informative steps, whose least-squares slope is
  ``slope`` (per step; only defined once the window is full);
* ``level < target`` → *raise* ρ by ``step_up`` ("below_target");
* else ``slope < −slope_tol`` → *raise* ("declining");
* else ``level ≥ high`` and ``|slope| ≤ slope_tol`` → *lower* ρ by ``step_down`` ("stable_high");
* else *hold* (inside the dead band ``[target, high)``, or high but still moving);
* ρ is clipped to ``[rho_min, rho_max]``.

Raising is faster than lowering by default: losing the ability to keep correct answers is the failure the
mechanism exists to prevent, while a few extra replays only cost some correction budget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from .pass_rate import PromptId
from .selector import PromptResult

RAISE_BELOW_TARGET = "below_target"
RAISE_DECLINING = "declining"
LOWER_STABLE_HIGH = "stable_high"
HOLD = "hold"
HOLD_NO_DATA = "no_data"


def retention(retained: int, total: int) -> Optional[float]:
    """``retained / total``, or None when no rollout was conditioned on a correct trajectory."""
    if total < 0 or retained < 0 or retained > total:
        raise ValueError(f"need 0 <= retained <= total; got retained={retained}, total={total}")
    return retained / total if total else None


def least_squares_slope(values: Sequence[float]) -> float:
    """Slope of the least-squares line through ``(i, values[i])``; 0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x = (n - 1) / 2.0
    mean_y = sum(values) / n
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    return sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / sxx


@dataclass(frozen=True)
class ReplayDecision:
    """What one :meth:`ReplayController.update` did (for metrics)."""

    rho: float
    action: str
    retention: Optional[float]
    level: Optional[float]
    slope: Optional[float]
    num_samples: int

    def metrics(self) -> dict[str, float]:
        out = {"replay/rho": self.rho, "replay/num_samples": float(self.num_samples),
               "replay/raised": float(self.action in (RAISE_BELOW_TARGET, RAISE_DECLINING)),
               "replay/lowered": float(self.action == LOWER_STABLE_HIGH)}
        for name in ("retention", "level", "slope"):
            value = getattr(self, name)
            if value is not None:
                out[f"replay/{name}"] = value
        return out


class ReplayController:
    """The adaptive replay ratio ρ_t, driven by retention (see the module docstring for the rule).

    Args:
        rho_init: ρ at step 0.
        rho_min, rho_max: bounds, ``0 ≤ rho_min ≤ rho_init ≤ rho_max ≤ 1``.
        step_up, step_down: the change of ρ when raising / lowering. ≥ 0.
        target: retention level below which ρ is raised.
        high: retention level at or above which a stable retention lets ρ fall (``target ≤ high``).
        window: number of informative steps in the slope window. ≥ 2.
        slope_tol: per-step slope counted as a decline (below ``−slope_tol``) or as stable (``|slope| ≤``).
        ema_decay: d of the retention level's EMA. In [0, 1).
        min_samples: correct-conditioned rollouts a step needs to count. ≥ 1.
    """

    def __init__(self, rho_init: float = 0.25, rho_min: float = 0.1, rho_max: float = 0.5, step_up: float = 0.05,
                 step_down: float = 0.025, target: float = 0.8, high: float = 0.9, window: int = 20,
                 slope_tol: float = 0.004, ema_decay: float = 0.7, min_samples: int = 8) -> None:
        if not 0.0 <= rho_min <= rho_init <= rho_max <= 1.0:
            raise ValueError(f"ReplayController needs 0 <= rho_min <= rho_init <= rho_max <= 1; got "
                             f"rho_min={rho_min}, rho_init={rho_init}, rho_max={rho_max}")
        if step_up < 0 or step_down < 0:
            raise ValueError(f"ReplayController.step_up/step_down must be >= 0; got {step_up}, {step_down}")
        if not 0.0 <= target <= high <= 1.0:
            raise ValueError(f"ReplayController needs 0 <= target <= high <= 1; got target={target}, high={high}")
        if window < 2:
            raise ValueError(f"ReplayController.window must be an int >= 2; got {window}")
        if slope_tol < 0:
            raise ValueError(f"ReplayController.slope_tol must be >= 0; got {slope_tol}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ReplayController.ema_decay must be in [0, 1); got {ema_decay}")
        if min_samples < 1:
            raise ValueError(f"ReplayController.min_samples must be an int >= 1; got {min_samples}")
        self.rho_init, self.rho_min, self.rho_max = float(rho_init), float(rho_min), float(rho_max)
        self.step_up, self.step_down = float(step_up), float(step_down)
        self.target, self.high = float(target), float(high)
        self.window, self.slope_tol = int(window), float(slope_tol)
        self.ema_decay, self.min_samples = float(ema_decay), int(min_samples)
        self.rho = self.rho_init
        self.level: Optional[float] = None
        self.history: deque[float] = deque(maxlen=self.window)
        self.num_updates = 0
        self.last_decision: Optional[ReplayDecision] = None

    @classmethod
    def from_config(cls, config: Any) -> "ReplayController":
        """From a :class:`~cipo.algorithm.config.CIPOConfig`."""
        return cls(rho_init=config.rho_init, rho_min=config.rho_min, rho_max=config.rho_max,
                   step_up=config.rho_step_up, step_down=config.rho_step_down, target=config.retention_target,
                   high=config.retention_high, window=config.retention_window,
                   slope_tol=config.retention_slope_tol, ema_decay=config.retention_ema_decay,
                   min_samples=config.retention_min_samples)

    def update(self, retained: int, total: int) -> ReplayDecision:
        """Feed one step's retention counts (``correct→correct`` and all correct-conditioned rollouts) and move
        ρ by the rule. Returns the decision; :attr:`rho` is the ratio for the next step."""
        value = retention(retained, total)
        self.num_updates += 1
        if value is None or total < self.min_samples:
            decision = ReplayDecision(self.rho, HOLD_NO_DATA, value, self.level, self._slope(), total)
            self.last_decision = decision
            return decision
        self.level = value if self.level is None else self.ema_decay * self.level + (1 - self.ema_decay) * value
        self.history.append(value)
        slope = self._slope()
        if self.level < self.target:
            action = RAISE_BELOW_TARGET
        elif slope is not None and slope < -self.slope_tol:
            action = RAISE_DECLINING
        elif self.level >= self.high and slope is not None and abs(slope) <= self.slope_tol:
            action = LOWER_STABLE_HIGH
        else:
            action = HOLD
        # Rounded so that repeated ±step keeps ρ on its grid (0.15, not 0.15000000000000002) in logs and plots.
        if action in (RAISE_BELOW_TARGET, RAISE_DECLINING):
            self.rho = min(self.rho_max, max(self.rho_min, round(self.rho + self.step_up, 12)))
        elif action == LOWER_STABLE_HIGH:
            self.rho = min(self.rho_max, max(self.rho_min, round(self.rho - self.step_down, 12)))
        decision = ReplayDecision(self.rho, action, value, self.level, slope, total)
        self.last_decision = decision
        return decision

    def _slope(self) -> Optional[float]:
        return least_squares_slope(list(self.history)) if len(self.history) == self.window else None

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (ρ, the level, the window, the update count)."""
        return {"rho": self.rho, "level": self.level, "history": list(self.history), "num_updates": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; ρ is clipped to this controller's bounds (a resumed run may
        change them)."""
        self.rho = min(self.rho_max, max(self.rho_min, float(state["rho"])))
        self.level = None if state["level"] is None else float(state["level"])
        self.history = deque((float(v) for v in state["history"]), maxlen=self.window)
        self.num_updates = int(state["num_updates"])
        self.last_decision = None


class TrajectoryPool:
    """Where conditioning trajectories come from: this step's results (online) or a frozen early pool (offline).

    Offline (the paper's ablation): the base results of the first ``collect_steps`` steps are stored; from
    then on the pool is frozen and the correction stream draws only from it, however the policy changes. While
    collecting, the pool is what has been collected so far (this step included). A prompt collected twice
    keeps its latest trajectories.

    Args:
        offline: use the frozen pool; False makes :meth:`candidates` return the step's results unchanged.
        collect_steps: number of initial steps whose results are stored. ≥ 1.
    """

    def __init__(self, offline: bool = False, collect_steps: int = 8) -> None:
        if collect_steps < 1:
            raise ValueError(f"TrajectoryPool.collect_steps must be an int >= 1; got {collect_steps}")
        self.offline = bool(offline)
        self.collect_steps = int(collect_steps)
        self._pool: dict[PromptId, PromptResult] = {}
        self._steps_collected: list[int] = []

    @classmethod
    def from_config(cls, config: Any) -> "TrajectoryPool":
        return cls(offline=config.offline, collect_steps=config.offline_collect_steps)

    @property
    def frozen(self) -> bool:
        return len(self._steps_collected) >= self.collect_steps

    def __len__(self) -> int:
        return len(self._pool)

    def candidates(self, step_results: Sequence[PromptResult], step: int) -> list[PromptResult]:
        """The candidates of the correction batch of ``step``: ``step_results`` online; the pool offline
        (after adding ``step_results`` while still collecting). Call once per step."""
        if not self.offline:
            return list(step_results)
        if not self.frozen and step not in self._steps_collected:
            for result in step_results:
                self._pool[result.prompt_id] = PromptResult.from_dict(result.to_dict())  # a detached copy
            self._steps_collected.append(step)
        return list(self._pool.values())

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the stored results (prompts, trajectory texts, token ids when given)."""
        return {"steps_collected": list(self._steps_collected),
                "pool": [result.to_dict() for result in self._pool.values()]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._steps_collected = [int(s) for s in state["steps_collected"]]
        self._pool = {}
        for values in state["pool"]:
            result = PromptResult.from_dict(values)
            self._pool[result.prompt_id] = result
