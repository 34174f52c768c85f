"""Plot the replay controller on simulated retention traces: docs/img/replay_controller.png.

Run: ``python docs/make_replay_plot.py`` (a few seconds on CPU, deterministic).

Each step, the correction batch has ``round(ρ · B_c)`` correct-conditioned prompts with M rollouts each, so
the measured retention pools ``round(ρ · B_c)`` groups of M rollouts. Prompts differ: each group's own retention
is drawn from Beta(κ·p, κ·(1 − p)) around the true retention p (κ = 10, an intra-group correlation of 1/11),
then its M rollouts are Bernoulli — so the controller sees realistic, over-dispersed sampling noise, and less of
it when ρ is high. Five traces:

* falling — retention collapses from 0.93 to 0.60 between steps 40 and 100 (what an almost-all-failures
  correction stream risks);
* stable-high — 0.95 throughout: ρ should decay to ``rho_min``, spending the budget on failures;
* rising — from 0.60 up to 0.95 (the policy learns to keep answers): ρ rises, holds, then decays;
* noisy — 0.85, inside the dead band ``[target, high)``: ρ should mostly hold;
* closed loop — a toy policy whose retention drifts by ``κ · (ρ − ρ*)`` per step, ρ* jumping 0.2 → 0.4 at step
  100: the controller has to find the replay the policy needs.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Callable, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cipo.algorithm import CIPOConfig, ReplayController  # noqa: E402

STEPS = 200
KAPPA = 10.0  # Beta concentration of per-prompt retention around the true retention


def _ramp(start: float, end: float, t0: int, t1: int) -> Callable[[int, float], float]:
    def trace(t: int, rho: float) -> float:
        if t <= t0:
            return start
        if t >= t1:
            return end
        return start + (end - start) * (t - t0) / (t1 - t0)
    return trace


def _closed_loop() -> Callable[[int, float], float]:
    state = {"r": 0.9}

    def trace(t: int, rho: float) -> float:
        target_rho = 0.2 if t < 100 else 0.4
        state["r"] = min(0.97, max(0.3, state["r"] + 0.15 * (rho - target_rho)))
        return state["r"]
    return trace


TRACES: dict[str, Callable[[], Callable[[int, float], float]]] = {
    "falling": lambda: _ramp(0.93, 0.60, 40, 100),
    "stable-high": lambda: _ramp(0.95, 0.95, 0, 1),
    "rising": lambda: _ramp(0.60, 0.95, 20, 100),
    "noisy (dead band)": lambda: _ramp(0.85, 0.85, 0, 1),
    "closed loop": _closed_loop,
}


def simulate(trace: Callable[[int, float], float], config: CIPOConfig, steps: int = STEPS, seed: int = 0
             ) -> dict[str, list[Optional[float]]]:
    """Run the controller on a trace ``(step, rho) -> true retention``; returns per-step series."""
    rng = random.Random(seed)
    controller = ReplayController.from_config(config)
    out: dict[str, list[Optional[float]]] = {"true": [], "measured": [], "level": [], "rho": []}
    for t in range(steps):
        rho = controller.rho
        p = trace(t, rho)
        groups = round(rho * config.correction_batch_size)
        retained = 0
        for _ in range(groups):
            p_group = rng.betavariate(KAPPA * p, KAPPA * (1 - p))
            retained += sum(rng.random() < p_group for _ in range(config.correction_rollouts))
        decision = controller.update(retained, groups * config.correction_rollouts)
        out["true"].append(p)
        out["measured"].append(decision.retention)
        out["level"].append(decision.level)
        out["rho"].append(rho)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "img" / "replay_controller.png"))
    args = parser.parse_args()
    config = CIPOConfig()
    fig, axes = plt.subplots(len(TRACES), 1, figsize=(9, 2.3 * len(TRACES)), sharex=True)
    for ax, (name, make) in zip(axes, TRACES.items()):
        series = simulate(make(), config)
        steps = range(STEPS)
        ax.plot(steps, series["measured"], ".", ms=3, color="tab:blue", alpha=0.45, label="measured retention")
        ax.plot(steps, series["true"], "-", lw=1, color="tab:gray", label="true retention")
        ax.plot(steps, series["level"], "-", lw=1.5, color="tab:blue", label="level (EMA)")
        ax.axhline(config.retention_target, ls="--", lw=0.8, color="tab:red", label="target")
        ax.axhline(config.retention_high, ls=":", lw=0.8, color="tab:green", label="high")
        ax.set_ylim(0.45, 1.0)
        ax.set_ylabel("retention")
        ax.set_title(name, fontsize=10, loc="left")
        twin = ax.twinx()
        twin.step(steps, series["rho"], where="post", color="tab:orange", lw=1.8, label="ρ")
        twin.set_ylim(0.0, 0.6)
        twin.set_ylabel("ρ", color="tab:orange")
        if ax is axes[0]:
            handles = ax.get_legend_handles_labels()
            twin_handles = twin.get_legend_handles_labels()
            ax.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], fontsize=7, ncol=6,
                      loc="lower left")
    axes[-1].set_xlabel("training step")
    fig.suptitle(f"Replay controller (defaults: ρ ∈ [{config.rho_min}, {config.rho_max}], target "
                 f"{config.retention_target}, high {config.retention_high}, window {config.retention_window})",
                 fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
