"""All components together over simulated steps: determinism, and a checkpoint mid-run changes nothing."""

from __future__ import annotations

import json
import random

from cipo.algorithm import (
    CIPOConfig,
    DifficultySelector,
    PassRateTracker,
    ReplayController,
    Rollout,
    RolloutGroup,
    TrajectoryPool,
    assemble_step,
    build_correction_prompts,
    shape_correction_groups,
    step_advantages,
)

from .helpers import char_decode, char_encode, random_results

CONFIG = CIPOConfig(train_batch_size=12, correction_batch_size=10, correction_rollouts=3,
                    retention_min_samples=2, retention_window=3, seed=11)


class Run:
    """The algorithm's state for one run; a fake policy produces results and correction outcomes."""

    def __init__(self, config: CIPOConfig) -> None:
        self.config = config
        self.tracker = PassRateTracker(config.pass_rate_ema_decay)
        self.controller = ReplayController.from_config(config)
        self.pool = TrajectoryPool.from_config(config)
        self.selector = DifficultySelector.from_config(config)

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict(), "controller": self.controller.state_dict(),
                "pool": self.pool.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.controller.load_state_dict(state["controller"])
        self.pool.load_state_dict(state["pool"])

    def step(self, step: int) -> dict:
        rng = random.Random(1000 + step)  # the fake policy and verifier of this step
        results = random_results(rng, self.config.train_batch_size, id_offset=(step % 3) * 5)
        self.tracker.update({r.prompt_id: [t.correct for t in r.trajectories] for r in results}, step)
        candidates = self.pool.candidates(results, step)
        selection = self.selector.select(candidates, self.config.correction_batch_size, self.controller.rho, step,
                                         pass_rates=self.tracker.pass_rates(self.config.pass_rate_source))
        prompts = build_correction_prompts(selection, candidates, self.config.template, encode=char_encode,
                                           decode=char_decode)
        corr = [RolloutGroup(prompt_ids=char_encode(p.text[:20]),
                             rollouts=[Rollout([1, 2], float(ok), correct=ok)
                                       for ok in (rng.random() < (0.8 if pick.was_correct else 0.3)
                                                  for _ in range(self.config.correction_rollouts))],
                             prompt_id=pick.prompt_id, conditioning_correct=pick.was_correct)
                for pick, p in zip(selection.picks, prompts)]
        base = [RolloutGroup([7], [Rollout([8], float(t.correct)) for t in r.trajectories]) for r in results]
        corr, shaping = shape_correction_groups(corr, self.config)
        batch = assemble_step(base, corr, self.config)
        adv = step_advantages(batch, self.config, regression=shaping.regression)
        c = shaping.counts
        decision = self.controller.update(c["correct_to_correct"], c["correct_to_correct"] + c["correct_to_incorrect"])
        return {"picks": [(p.prompt_id, p.trajectory_index, p.reason) for p in selection.picks],
                "rho": decision.rho, "adv": adv.tolist(), "prompts": [p.text for p in prompts]}


def run_steps(run: Run, steps: range) -> list[dict]:
    return [run.step(t) for t in steps]


def test_same_seed_same_run_and_checkpoint_resume_is_exact():
    for config in (CONFIG, CIPOConfig(**{**CONFIG.to_dict(), "offline": True, "offline_collect_steps": 2})):
        reference = run_steps(Run(config), range(8))
        assert run_steps(Run(config), range(8)) == reference
        first = Run(config)
        head = run_steps(first, range(4))
        state = json.loads(json.dumps(first.state_dict()))
        resumed = Run(config)
        resumed.load_state_dict(state)
        assert head + run_steps(resumed, range(4, 8)) == reference


def test_offline_uses_only_early_prompts():
    config = CIPOConfig(**{**CONFIG.to_dict(), "offline": True, "offline_collect_steps": 1})
    run = Run(config)
    outputs = run_steps(run, range(4))
    early = {p for p, _, _ in outputs[0]["picks"]} | {r.prompt_id for r in run.pool.candidates([], 99)}
    for out in outputs[1:]:
        assert {p for p, _, _ in out["picks"]} <= early
