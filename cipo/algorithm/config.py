"""``CIPOConfig``: every knob of CIPO's algorithm. docs/ALGORITHM.md justifies each default."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from .pass_rate import PASS_RATE_SOURCES
from .shaping import SHAPING_TARGETS
from .template import CorrectionTemplate


def _require(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"CIPOConfig.{name} must be {allowed}; got {value!r}")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CIPOConfig:
    """The CIPO algorithm's knobs (the loss's are in :class:`cipo.PolicyLossConfig`).

    Streams and sizes:
        correction_enabled: run the correction stream at all (False: plain GRPO).
        lambda_corr: λ in ``L = L_base + λ · L_corr``. ≥ 0; 0 turns the stream off.
        train_batch_size: base prompts per step. ≥ 1.
        rollouts_per_prompt: G, base responses per prompt. ≥ 1.
        correction_batch_size: B_c, correction prompts per step. ≥ 0; 0 turns the stream off.
        correction_rollouts: M, refinements sampled per correction prompt. ≥ 1.

    Replay ratio ρ (share of successful conditioning trajectories) and its controller:
        rho_init, rho_min, rho_max: start and bounds, ``0 ≤ rho_min ≤ rho_init ≤ rho_max ≤ 1``.
        rho_step_up, rho_step_down: change of ρ when raising / lowering. In [0, 1].
        retention_target: retention level below which ρ rises. In [0, 1].
        retention_high: stable retention at or above this lets ρ fall. In [retention_target, 1].
        retention_window: informative steps in the slope window. ≥ 2.
        retention_slope_tol: per-step slope counted as a decline (< −tol) or as stable (|slope| ≤ tol). ≥ 0.
        retention_ema_decay: decay of the retention level's EMA. In [0, 1).
        retention_min_samples: correct-conditioned rollouts a step needs to inform the controller. ≥ 1.

    Shaping:
        alpha: α, the extra penalty of a correct→incorrect regression. ≥ 0.
        shaping_target: ``"advantage"`` (``A − α`` after normalisation) or ``"reward"`` (``r − α`` before).

    Difficulty-aware selection:
        p_low, p_high: the preferred pass-rate band, edges included, ``0 ≤ p_low ≤ p_high ≤ 1``.
        pass_rate_source: ``"ema"`` (history, this step included) or ``"step"`` (this step's base rollouts).
        pass_rate_ema_decay: decay of the per-prompt pass-rate EMA. In [0, 1).

    Template, offline variant, seed:
        template: a :class:`CorrectionTemplate` (wording and token budget); a mapping is converted.
        offline: conditioning trajectories only from the first ``offline_collect_steps`` steps.
        offline_collect_steps: steps whose base results fill the offline pool. ≥ 1.
        seed: seed of the selector's per-step RNG.
    """

    correction_enabled: bool = True
    lambda_corr: float = 1.0
    train_batch_size: int = 128
    rollouts_per_prompt: int = 8
    correction_batch_size: int = 128
    correction_rollouts: int = 8
    rho_init: float = 0.25
    rho_min: float = 0.1
    rho_max: float = 0.5
    rho_step_up: float = 0.05
    rho_step_down: float = 0.025
    retention_target: float = 0.8
    retention_high: float = 0.9
    retention_window: int = 20
    retention_slope_tol: float = 0.004
    retention_ema_decay: float = 0.7
    retention_min_samples: int = 8
    alpha: float = 0.5
    shaping_target: str = "advantage"
    p_low: float = 0.125
    p_high: float = 0.875
    pass_rate_source: str = "ema"
    pass_rate_ema_decay: float = 0.5
    template: CorrectionTemplate = field(default_factory=CorrectionTemplate)
    offline: bool = False
    offline_collect_steps: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.template, Mapping):
            object.__setattr__(self, "template", CorrectionTemplate.from_dict(self.template))
        _require(isinstance(self.correction_enabled, bool), "correction_enabled", "a bool", self.correction_enabled)
        _require(_is_real(self.lambda_corr) and self.lambda_corr >= 0, "lambda_corr", "a float >= 0",
                 self.lambda_corr)
        for name in ("train_batch_size", "rollouts_per_prompt", "correction_rollouts", "retention_min_samples",
                     "offline_collect_steps"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, "an int >= 1", value)
        _require(_is_int(self.correction_batch_size) and self.correction_batch_size >= 0, "correction_batch_size",
                 "an int >= 0", self.correction_batch_size)
        for name in ("rho_init", "rho_min", "rho_max", "rho_step_up", "rho_step_down", "retention_target",
                     "retention_high", "p_low", "p_high"):
            value = getattr(self, name)
            _require(_is_real(value) and 0.0 <= value <= 1.0, name, "a float in [0, 1]", value)
        _require(self.rho_min <= self.rho_max, "rho_max", f"a float in [rho_min={self.rho_min}, 1]", self.rho_max)
        _require(self.rho_min <= self.rho_init <= self.rho_max, "rho_init",
                 f"a float in [rho_min={self.rho_min}, rho_max={self.rho_max}]", self.rho_init)
        _require(self.retention_target <= self.retention_high, "retention_high",
                 f"a float in [retention_target={self.retention_target}, 1]", self.retention_high)
        _require(_is_int(self.retention_window) and self.retention_window >= 2, "retention_window", "an int >= 2",
                 self.retention_window)
        _require(_is_real(self.retention_slope_tol) and self.retention_slope_tol >= 0, "retention_slope_tol",
                 "a float >= 0", self.retention_slope_tol)
        for name in ("retention_ema_decay", "pass_rate_ema_decay"):
            value = getattr(self, name)
            _require(_is_real(value) and 0.0 <= value < 1.0, name, "a float in [0, 1)", value)
        _require(_is_real(self.alpha) and self.alpha >= 0, "alpha", "a float >= 0", self.alpha)
        _require(self.shaping_target in SHAPING_TARGETS, "shaping_target", f"one of {SHAPING_TARGETS}",
                 self.shaping_target)
        _require(self.p_low <= self.p_high, "p_high", f"a float in [p_low={self.p_low}, 1]", self.p_high)
        _require(self.pass_rate_source in PASS_RATE_SOURCES, "pass_rate_source", f"one of {PASS_RATE_SOURCES}",
                 self.pass_rate_source)
        _require(isinstance(self.template, CorrectionTemplate), "template", "a CorrectionTemplate or a mapping",
                 self.template)
        _require(isinstance(self.offline, bool), "offline", "a bool", self.offline)
        _require(_is_int(self.seed), "seed", "an int", self.seed)

    @property
    def correction_active(self) -> bool:
        """Whether a step has a correction stream: enabled, λ > 0 and a non-empty correction batch."""
        return self.correction_enabled and self.lambda_corr > 0 and self.correction_batch_size > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain types (the template as a nested mapping), for YAML/JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CIPOConfig":
        """Build from a mapping (a YAML section); unknown keys raise a ValueError that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CIPOConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)
