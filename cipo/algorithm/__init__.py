"""CIPO's algorithmic core as pure components (no model): docs/ALGORITHM.md describes every rule and default.

One object owns the correction stream of a run, :class:`CorrectionStream` (the pass-rate tracker, the trajectory
pool, the difficulty selector and the replay controller); every trainer drives it the same way::

    stream = CorrectionStream(config, encode=..., decode=...)
    # each step, after sampling and verifying the base stream into `results` (PromptResult per prompt):
    proposal = stream.propose(results, step)        # pass rates, candidates, picks (ρ), correction prompts
    # ... sample config.correction_rollouts refinements of each proposal.prompts[i], verify → groups (pick order)
    outcome = stream.absorb(proposal, groups)       # shaping (α), ρ update from the retention
    batch = assemble_step(base_groups, outcome.groups, config)
    advantages = step_advantages(batch, config, regression=outcome.regression)
    loss, metrics = cipo.cipo_policy_loss(logp, batch, loss_config, lambda_corr=config.lambda_corr,
                                          advantages=advantages)    # or the fused loss, micro-batched

A trainer that keeps its own base-stream advantages takes ``outcome.advantages(config)`` for the correction
rollouts instead. ``CorrectionStream.state_dict()`` / ``load_state_dict()`` are JSON-serialisable; the selector
is stateless (seeded by ``(seed, step)``), so a resumed run makes the same picks.
"""

from .assembly import (
    Rollout,
    RolloutGroup,
    assemble_step,
    build_correction_prompts,
    shape_correction_groups,
    shaped_group_advantages,
    step_advantages,
)
from .config import CIPOConfig
from .pass_rate import PassRateTracker, PromptStats
from .replay import ReplayController, ReplayDecision, TrajectoryPool, least_squares_slope, retention
from .selector import DifficultySelector, Pick, PromptResult, Selection, Trajectory
from .shaping import TRANSITIONS, ShapingResult, shape_advantages, shape_rewards, transition_counts
from .stream import CorrectionOutcome, CorrectionProposal, CorrectionStream
from .template import VERDICT_PATTERN, CorrectionPrompt, CorrectionTemplate, correction_prompt_ids, truncate_attempt

__all__ = [
    "CIPOConfig",
    "CorrectionOutcome",
    "CorrectionPrompt",
    "CorrectionProposal",
    "CorrectionStream",
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
    "shaped_group_advantages",
    "step_advantages",
    "transition_counts",
    "correction_prompt_ids",
    "truncate_attempt",
]
