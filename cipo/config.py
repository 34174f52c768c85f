"""Configuration of the policy loss (verl's actor knobs, under their verl names)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
"""Aggregation modes, docs/DESIGN.md §4 (verl's ``agg_loss``)."""

KL_TYPES = {
    "k1": "k1",
    "kl": "k1",
    "k2": "k2",
    "mse": "k2",
    "k3": "k3",
    "low_var_kl": "k3",
    "abs": "abs",
    # verl 0.9.1's straight-through variants: the estimator's value, k2's gradient (k2+ is k2)
    "k1+": "k1+",
    "kl+": "k1+",
    "k2+": "k2",
    "mse+": "k2",
    "k3+": "k3+",
    "low_var_kl+": "k3+",
    "abs+": "abs+",
}
"""Accepted ``kl_type`` spellings mapped to their canonical estimator name."""

TIS_MODES = (None, "token", "sequence")


def _require(ok: bool, field: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"PolicyLossConfig.{field} must be {allowed}; got {value!r}")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class PolicyLossConfig:
    """Knobs of the clipped policy-gradient loss, with verl's names and defaults.

    Attributes:
        clip_ratio_low: ε_low; the ratio is clipped below at ``1 − ε_low``. In [0, 1).
        clip_ratio_high: ε_high (clip-higher, DAPO); the ratio is clipped above at ``1 + ε_high``. ≥ 0.
        clip_ratio_c: dual-clip bound c > 1 for negative advantages; ``None`` disables dual-clip.
        loss_agg_mode: one of :data:`LOSS_AGG_MODES`.
        loss_scale_factor: constant divisor of ``seq-mean-token-sum-norm`` (Dr.GRPO, e.g. the maximum
            response length). ``None`` means the padded length ``L`` of ``[B, L]`` inputs or the longest
            sequence of packed inputs, as verl does.
        kl_coef: β of the KL penalty to the reference policy (0 disables it). ≥ 0.
        kl_type: KL estimator: ``k1``/``kl``, ``k2``/``mse``, ``k3``/``low_var_kl``, ``abs``; a ``+`` suffix
            (verl's straight-through, e.g. ``low_var_kl+``) keeps the value and takes k2's gradient.
        entropy_coef: coefficient of the entropy bonus (subtracted from the loss). ≥ 0.
        tis_mode: truncated importance sampling against rollout-engine log-probs: ``None``, ``"token"`` or
            ``"sequence"``.
        tis_cap: C, the truncation of the importance weight ``min(exp(old − rollout), C)``. > 0.
        temperature: sampling temperature T; logits are divided by T before the log-softmax. > 0.
    """

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: Optional[float] = 3.0
    loss_agg_mode: str = "token-mean"
    loss_scale_factor: Optional[float] = None
    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"
    entropy_coef: float = 0.0
    tis_mode: Optional[str] = None
    tis_cap: float = 2.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _require(_is_real(self.clip_ratio_low) and 0 <= self.clip_ratio_low < 1, "clip_ratio_low",
                 "a float in [0, 1)", self.clip_ratio_low)
        _require(_is_real(self.clip_ratio_high) and self.clip_ratio_high >= 0, "clip_ratio_high",
                 "a float >= 0", self.clip_ratio_high)
        _require(self.clip_ratio_c is None or (_is_real(self.clip_ratio_c) and self.clip_ratio_c > 1),
                 "clip_ratio_c", "None (dual-clip off) or a float > 1", self.clip_ratio_c)
        _require(self.loss_agg_mode in LOSS_AGG_MODES, "loss_agg_mode", f"one of {LOSS_AGG_MODES}",
                 self.loss_agg_mode)
        _require(self.loss_scale_factor is None or (_is_real(self.loss_scale_factor) and self.loss_scale_factor > 0),
                 "loss_scale_factor", "None or a float > 0", self.loss_scale_factor)
        _require(_is_real(self.kl_coef) and self.kl_coef >= 0, "kl_coef", "a float >= 0", self.kl_coef)
        _require(self.kl_type in KL_TYPES, "kl_type", f"one of {tuple(KL_TYPES)}", self.kl_type)
        _require(_is_real(self.entropy_coef) and self.entropy_coef >= 0, "entropy_coef", "a float >= 0",
                 self.entropy_coef)
        _require(self.tis_mode in TIS_MODES, "tis_mode", f"one of {TIS_MODES}", self.tis_mode)
        _require(_is_real(self.tis_cap) and self.tis_cap > 0, "tis_cap", "a float > 0", self.tis_cap)
        _require(_is_real(self.temperature) and self.temperature > 0, "temperature", "a float > 0",
                 self.temperature)

    @property
    def kl_estimator(self) -> str:
        """Canonical KL estimator name: ``k1``, ``k2``, ``k3``, ``abs``, ``k1+``, ``k3+`` or ``abs+``."""
        return KL_TYPES[self.kl_type]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PolicyLossConfig":
        """Build from a mapping (a YAML section); unknown keys raise a ValueError that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PolicyLossConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)
