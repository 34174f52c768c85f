"""One training step's metrics and the run's metrics log.

:class:`StepMetrics` accumulates a step's floats, loss metrics over micro-batches and ranks (the step's aggregated
terms add up, per-token means are weighted by loss tokens); :func:`truncate_metrics_log` cuts ``metrics.jsonl``
back to a resumed checkpoint's step without losing what it drops.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .checkpoint import atomic_write_text

# Loss metrics that are the step's aggregated terms: the loss normalises them over the whole step (global
# per-stream counts), so micro-batches and ranks contribute parts that add up. The others are per-token means.
ADDITIVE_LOSS_METRICS = frozenset({"pg_loss", "kl", "entropy", "loss/base", "loss/corr", "tokens/base",
                                   "tokens/corr"})


@dataclass
class StepMetrics:
    """One step's floats. Loss metrics of micro-batches accumulate by :meth:`add_loss_metrics`."""

    values: dict[str, float] = field(default_factory=dict)
    _weights: dict[str, Optional[float]] = field(default_factory=dict)  # None: an additive metric

    def set(self, **kwargs: float) -> None:
        self.values.update({k: float(v) for k, v in kwargs.items()})

    def update(self, prefix: str, metrics: dict[str, float]) -> None:
        self.values.update({f"{prefix}{k}": float(v) for k, v in metrics.items()})

    def add_loss_metrics(self, metrics: dict[str, float], weight: float, prefix: str = "actor/") -> None:
        """Add one micro-batch's loss metrics: the step's terms are summed, per-token means are averaged with
        ``weight`` (the micro-batch's loss tokens)."""
        for key, value in metrics.items():
            self._add(prefix + key, float(value), None if key in ADDITIVE_LOSS_METRICS else weight)

    def _add(self, name: str, value: float, weight: Optional[float]) -> None:
        previous = self.values.get(name, 0.0)
        if weight is None:
            self.values[name] = previous + value
            self._weights[name] = None
            return
        total = (self._weights.get(name) or 0.0) + weight
        self.values[name] = previous + (value - previous) * (weight / total if total else 0.0)
        self._weights[name] = total

    def loss_part(self) -> dict[str, tuple[float, Optional[float]]]:
        """The accumulated loss metrics with their weights, ``{name: (value, weight)}``: what ranks exchange."""
        return {name: (self.values[name], weight) for name, weight in self._weights.items()}

    def merge_loss_parts(self, parts: list[dict[str, tuple[float, Optional[float]]]]) -> None:
        """Set the loss metrics to those over every rank's part (each rank passes the same list, in rank order)."""
        merged = StepMetrics()
        for part in parts:
            for name, (value, weight) in part.items():
                merged._add(name, value, weight)
        self.values.update(merged.values)


# Metrics an update sets besides the loss's own: never copied to ``actor/last/``.
UPDATE_METRICS = frozenset({"loss", "grad_norm", "padding_micro_batches"})


def mean_over_updates(per_update: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the updates that report it (one update: its values, unchanged)."""
    names = list(dict.fromkeys(name for values in per_update for name in values))
    out = {}
    for name in names:
        values = [u[name] for u in per_update if name in u]
        out[name] = sum(values[1:], values[0]) / len(values)
    return out


def mean_of(values) -> float:
    """The mean of ``values`` as floats (NaN for none)."""
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else math.nan


def truncate_metrics_log(path: Path, step: int) -> None:
    """Keep the metric lines of steps ≤ ``step`` (a resumed run rewrites what came after its checkpoint).

    A line that does not parse (a kill tore the last write, or the file was edited) is dropped with a warning;
    when any is, the file as it was is kept first as ``metrics.jsonl.bak``, so nothing written is lost."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    kept, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            line_step = record.get("step", 0) if isinstance(record, dict) else None
        except json.JSONDecodeError:
            line_step = None
        if not isinstance(line_step, (int, float)):
            bad.append(number)
        elif line_step <= step:
            kept.append(line)
    if bad:
        backup = path.with_name(path.name + ".bak")
        atomic_write_text(backup, text)
        print(f"cipo: warning: {path}: dropped {len(bad)} unreadable line(s) (line {', '.join(map(str, bad[:5]))}"
              f"{', ...' if len(bad) > 5 else ''}); the file as it was is kept in {backup}", file=sys.stderr)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
