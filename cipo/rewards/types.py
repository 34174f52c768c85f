"""The one result type every verifier returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class RewardResult:
    """A verifier's verdict on one response.

    ``score`` is the reward (1.0 or 0.0 for the binary verifiers here), ``reason`` a short machine-readable tag
    (``"correct"``, ``"wrong_answer"``, ``"timeout"``, ...), ``details`` free-form diagnostics (JSON-friendly).
    """

    score: float
    reason: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.score >= 1.0


@runtime_checkable
class Verifier(Protocol):
    """Anything with ``verify(response, reference) -> RewardResult`` (picklable, for :func:`verify_batch`)."""

    def verify(self, response: str, reference: Any) -> RewardResult: ...
