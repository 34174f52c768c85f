"""``CorrectionStream``: CIPO's correction stream of one step, and the state it carries from step to step.

A trainer calls it twice per step, around its own sampling and verification::

    stream = CorrectionStream(config, encode=..., decode=...)        # once per run
    proposal = stream.propose(results, step)     # base results → pass rates, candidates, picks, correction prompts
    # ... sample config.correction_rollouts refinements of each proposal.prompts[i], verify → groups (pick order)
    outcome = stream.absorb(proposal, groups)    # shaping (α), ρ controller update (retention)
    batch = assemble_step(base_groups, outcome.groups, config)
    advantages = step_advantages(batch, config, regression=outcome.regression)

``propose`` updates the :class:`PassRateTracker` (also when the stream is off: the pass rates are the base
stream's), asks the :class:`TrajectoryPool` for the candidates (online: this step's results; offline: the frozen
pool), lets the :class:`DifficultySelector` pick ``correction_batch_size`` conditioning trajectories with the
:class:`ReplayController`'s ρ, and builds their correction prompts. ``absorb`` shapes the verified refinements
and feeds the step's retention to the controller, so ρ moves for the next step. Nothing here knows a model, a
tokenizer or a trainer: ``encode``/``decode`` (the attempt's token budget) are plain callables, and the groups
are :class:`RolloutGroup` s, so any trainer (cipo's, TRL's, verl's) drives the same object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from .assembly import RolloutGroup, build_correction_prompts, shape_correction_groups, shaped_group_advantages
from .config import CIPOConfig
from .pass_rate import PassRateTracker
from .replay import ReplayController, ReplayDecision, TrajectoryPool
from .selector import DifficultySelector, Pick, PromptResult, Selection
from .shaping import ShapingResult
from .template import CorrectionPrompt, Decode, Encode

STATE_KEYS = ("tracker", "controller", "pool")
"""The keys of :meth:`CorrectionStream.state_dict` (also the trainer checkpoint's keys for these states)."""


@dataclass(frozen=True)
class CorrectionProposal:
    """What the stream asks the trainer to sample in one step.

    Attributes:
        step: the training step it was made for.
        candidates: the prompts the picks index (:attr:`Pick.result_index`).
        selection: the selector's picks, in order.
        prompts: the correction prompt of each pick, same order.
        metrics: ``select/*`` of the selection as the selector made it (before any :meth:`head`); empty when the
            stream is off.
    """

    step: int
    candidates: list[PromptResult]
    selection: Selection
    prompts: list[CorrectionPrompt]
    metrics: dict[str, float]

    @property
    def picks(self) -> list[Pick]:
        return self.selection.picks

    def __len__(self) -> int:
        return len(self.selection.picks)

    def head(self, count: int) -> "CorrectionProposal":
        """The first ``count`` picks and prompts only (for a trainer whose batch must split evenly); the metrics
        stay those of the full selection."""
        if not 0 <= count <= len(self):
            raise ValueError(f"count must be in [0, {len(self)}]; got {count}")
        selection = dataclasses.replace(self.selection, picks=self.selection.picks[:count])
        return dataclasses.replace(self, selection=selection, prompts=self.prompts[:count])


@dataclass(frozen=True)
class CorrectionOutcome:
    """The absorbed correction groups of one step.

    Attributes:
        groups: the correction groups, rewards shaped in ``"reward"`` mode, ``conditioning_correct`` set.
        shaping: the transition counts and the regression flags (one per correction rollout, in group order).
        decision: what the replay controller did with this step's retention.
    """

    groups: list[RolloutGroup]
    shaping: ShapingResult
    decision: ReplayDecision

    @property
    def regression(self) -> list[bool]:
        """One flag per correction rollout in group order: pass it to :func:`step_advantages`."""
        return self.shaping.regression

    def metrics(self) -> dict[str, float]:
        """``shaping/*`` and ``replay/*`` of the step."""
        return {**self.shaping.metrics(), **self.decision.metrics()}

    def advantages(self, config: CIPOConfig, *, estimator: str = "grpo",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[K]`` advantages of the correction rollouts alone (K = all rollouts, group order), for a trainer that
        normalises each stream by itself (TRL keeps its own base-stream advantages): the same rule as
        :func:`step_advantages` (:func:`shaped_group_advantages`), on rewards of ``dtype``. float32 matches
        :func:`step_advantages` on an assembled batch bit for bit; float64 keeps the subtraction of α in float64,
        which can differ from it by one float32 ulp once cast."""
        rewards = torch.tensor([r.reward for g in self.groups for r in g.rollouts], dtype=dtype)
        sizes = torch.tensor([len(g.rollouts) for g in self.groups])
        group_ids = torch.arange(len(self.groups)).repeat_interleave(sizes)
        return shaped_group_advantages(rewards, group_ids, self.regression, config, estimator=estimator)


class CorrectionStream:
    """The pass-rate tracker, trajectory pool, difficulty selector and replay controller of a run, and the two
    calls of a step that use them (see the module docstring).

    Args:
        config: the CIPO knobs.
        encode, decode: the policy tokenizer's text ↔ ids, to cut long attempts to the template's token budget
            (None: the template's behaviour without a tokenizer).
    """

    def __init__(self, config: CIPOConfig, *, encode: Optional[Encode] = None,
                 decode: Optional[Decode] = None) -> None:
        self.config = config
        self.encode, self.decode = encode, decode
        self.tracker = PassRateTracker(ema_decay=config.pass_rate_ema_decay)
        self.controller = ReplayController.from_config(config)
        self.pool = TrajectoryPool.from_config(config)
        self.selector = DifficultySelector.from_config(config)

    @property
    def rho(self) -> float:
        """The replay ratio of the next selection."""
        return self.controller.rho

    def propose(self, results: Sequence[PromptResult], step: int) -> CorrectionProposal:
        """Record the step's base results and choose its correction prompts.

        Args:
            results: each base prompt of the step with its verified trajectories (prompt ids unique).
            step: the training step (seeds the selector; the offline pool collects by step).

        Returns:
            The proposal; empty (no picks, no metrics) when ``config.correction_active`` is False.
        """
        self.tracker.update({r.prompt_id: [t.correct for t in r.trajectories] for r in results}, step)
        config = self.config
        if not config.correction_active:
            return CorrectionProposal(step, [], Selection(picks=[], num_requested=0, requested_success=0,
                                                          requested_failed=0), [], {})
        candidates = self.pool.candidates(results, step)
        selection = self.selector.select(candidates, config.correction_batch_size, self.controller.rho, step,
                                         pass_rates=self.tracker.pass_rates(config.pass_rate_source))
        prompts = build_correction_prompts(selection, candidates, config.template, encode=self.encode,
                                           decode=self.decode)
        return CorrectionProposal(step, candidates, selection, prompts, selection.metrics())

    def absorb(self, proposal: CorrectionProposal, groups: Sequence[RolloutGroup]) -> CorrectionOutcome:
        """Shape the verified refinements and move ρ by the step's retention.

        Args:
            proposal: what :meth:`propose` returned (after any :meth:`CorrectionProposal.head`); not empty —
                a step that sampled no correction prompt has nothing to absorb, and ρ holds.
            groups: one group per pick, in pick order, every rollout with ``correct`` set; the groups'
                ``conditioning_correct`` is taken from the picks.
        """
        if not len(proposal):
            raise ValueError("the proposal has no picks; a step without correction prompts has nothing to absorb")
        if len(groups) != len(proposal):
            raise ValueError(f"got {len(groups)} groups for {len(proposal)} picks; give one group per pick, in order")
        groups = [dataclasses.replace(g, conditioning_correct=p.was_correct) for g, p in zip(groups, proposal.picks)]
        shaped, shaping = shape_correction_groups(groups, self.config)
        retained = shaping.counts["correct_to_correct"]
        decision = self.controller.update(retained, retained + shaping.counts["correct_to_incorrect"])
        return CorrectionOutcome(shaped, shaping, decision)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state under :data:`STATE_KEYS` (the selector has none: it is seeded by step)."""
        return {"tracker": self.tracker.state_dict(), "controller": self.controller.state_dict(),
                "pool": self.pool.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; other keys of ``state`` are ignored (a trainer checkpoint holds
        these three keys next to its own)."""
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise KeyError(f"correction stream state lacks {missing}; expected the keys {list(STATE_KEYS)}")
        self.tracker.load_state_dict(state["tracker"])
        self.controller.load_state_dict(state["controller"])
        self.pool.load_state_dict(state["pool"])
