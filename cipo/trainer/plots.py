"""Training curves as one PNG: rewards, accuracy, correction success, ρ and the loss over steps."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

PANELS = [
    ("base/accuracy", "base accuracy (train prompts)"),
    ("corr/success", "correction success (train)"),
    ("replay/rho", "replay ratio ρ"),
    ("actor/loss", "loss"),
]


def plot_curves(metrics_path: Path, out_path: Path, summary: Optional[dict[str, Any]] = None) -> Optional[Path]:
    """Plot ``metrics.jsonl``; eval before/after from ``summary`` are drawn as dashed levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return None
    lines = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        return None
    steps = [line["step"] for line in lines]
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(7, 2.2 * len(PANELS)), sharex=True)
    for ax, (key, title) in zip(axes, PANELS):
        values = [line.get(key, math.nan) for line in lines]
        ax.plot(steps, values, marker="o", markersize=3, linewidth=1.2)
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    if summary:
        for ax, key, label in ((axes[0], "eval_accuracy", "held-out accuracy"),
                               (axes[1], "correction_success", "held-out correction success")):
            before, after = summary.get(f"{key}_before"), summary.get(f"{key}_after")
            if before is not None and after is not None:
                ax.axhline(before, color="grey", linestyle="--", linewidth=1, label=f"{label} before {before:.2f}")
                ax.axhline(after, color="green", linestyle="--", linewidth=1, label=f"{label} after {after:.2f}")
                ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
