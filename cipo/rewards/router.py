"""Reward routing: each response is scored by the verifier its row's ``data_source`` names (the trainer, ``cipo
eval`` and the warm start's accuracy checks all score through :class:`RewardScorer`).

The built-in synthetic task is scored in-process (an exact integer match, microseconds). Math and code go to
the verifiers of this package in worker processes — code is model output and runs only inside the sandbox there.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from ..data import synthetic
from .batch import VerifierPool, verify_batch
from .code_verifier import CodeVerifier
from .math_verifier import MathVerifier
from .verl import is_code_item

SYNTHETIC_SOURCES = frozenset({"synthetic_arith"})


def ground_truth(row: dict[str, Any]) -> Any:
    """The row's ground truth (verl's ``reward_model.ground_truth``)."""
    return row["reward_model"]["ground_truth"]


class RewardScorer:
    """Scores ``(row, response)`` pairs; keeps its verifier worker processes between calls."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers
        self._pools: dict[str, VerifierPool] = {}
        self._verifiers = {"math": MathVerifier(), "code": CodeVerifier()}

    def score(self, rows: Sequence[dict[str, Any]], responses: Sequence[str]) -> list[float]:
        """One reward in [0, 1] per response, in order."""
        if len(rows) != len(responses):
            raise ValueError(f"{len(rows)} rows for {len(responses)} responses")
        scores: list[Optional[float]] = [None] * len(rows)
        routed: dict[str, list[int]] = {"math": [], "code": []}
        for i, (row, response) in enumerate(zip(rows, responses)):
            source = row.get("data_source", "")
            if source in SYNTHETIC_SOURCES:
                scores[i] = synthetic.score(response, ground_truth(row))
            else:
                routed["code" if is_code_item(source, ground_truth(row)) else "math"].append(i)
        for kind, idx in routed.items():
            if not idx:
                continue
            results = verify_batch(self._verifiers[kind], [(responses[i], ground_truth(rows[i])) for i in idx],
                                   workers=self.workers, pool=self._pool(kind))
            for i, result in zip(idx, results):
                scores[i] = float(result.score)
        return [float(s) for s in scores]

    def _pool(self, kind: str) -> Optional[VerifierPool]:
        if self.workers <= 0:
            return None
        if kind not in self._pools:
            self._pools[kind] = VerifierPool(self._verifiers[kind], workers=self.workers)
        return self._pools[kind]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
