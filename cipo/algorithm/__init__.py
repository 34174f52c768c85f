"""CIPO's algorithmic core as pure components (no model): docs/ALGORITHM.md describes every rule and default.

One step, in order::

    tracker.update({pid: [t.correct for t in r.trajectories] for r in results}, step)   # pass rates
    candidates = pool.candidates(results, step)                 # this step's results, or the offline pool
    selection = selector.select(candidates, config.correction_batch_size, controller.rho, step,
                                pass_rates=tracker.pass_rates(config.pass_rate_source))
    prompts = build_correction_prompts(selection, candidates, config.template, encode=..., decode=...)
    # ... sample config.correction_rollouts refinements per prompt, verify → corr_groups ...
    corr_groups, shaping = shape_correction_groups(corr_groups, config)
    batch = assemble_step(base_groups, corr_groups, config)
    loss, metrics = step_loss(logp, batch, loss_config, config, regression=shaping.regression)
    controller.update(shaping.counts["correct_to_correct"],
                      shaping.counts["correct_to_correct"] + shaping.counts["correct_to_incorrect"])

Stateful parts (``PassRateTracker``, ``ReplayController``, ``TrajectoryPool``) have JSON-serialisable
``state_dict()`` / ``load_state_dict()``; the selector is stateless (seeded by ``(seed, step)``).
"""

from .assembly import (
    Rollout,
    RolloutGroup,
    assemble_step,
    build_correction_prompts,
    shape_correction_groups,
    step_advantages,
    step_loss,
)
from .config import CIPOConfig
from .pass_rate import PassRateTracker, PromptStats
from .replay import ReplayController, ReplayDecision, TrajectoryPool, least_squares_slope, retention
from .selector import DifficultySelector, Pick, PromptResult, Selection, Trajectory
from .shaping import TRANSITIONS, ShapingResult, shape_advantages, shape_rewards, transition_counts
from .template import VERDICT_PATTERN, CorrectionPrompt, CorrectionTemplate, correction_prompt_ids, truncate_attempt

__all__ = [
    "CIPOConfig",
    "CorrectionPrompt",
    "CorrectionTemplate",
    "DifficultySelector",
    "PassRateTracker",
    "Pick",
    "PromptResult",
    "PromptStats",
    "ReplayController",
    "ReplayDecision",
    "Rollout",
    "RolloutGroup",
    "Selection",
    "ShapingResult",
    "TRANSITIONS",
    "Trajectory",
    "TrajectoryPool",
    "VERDICT_PATTERN",
    "assemble_step",
    "build_correction_prompts",
    "least_squares_slope",
    "retention",
    "shape_advantages",
    "shape_correction_groups",
    "shape_rewards",
    "step_advantages",
    "step_loss",
    "transition_counts",
    "correction_prompt_ids",
    "truncate_attempt",
]
