"""CorrectionStream: the components' recipe behind one object, bit for bit, and its state across a resume."""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import pytest
import torch

from cipo.advantages import group_advantages
from cipo.algorithm import (
    CIPOConfig,
    CorrectionStream,
    DifficultySelector,
    PassRateTracker,
    ReplayController,
    Rollout,
    RolloutGroup,
    TrajectoryPool,
    assemble_step,
    build_correction_prompts,
    shape_advantages,
    shape_correction_groups,
    step_advantages,
)
from cipo.algorithm.stream import STATE_KEYS

from .helpers import char_decode, char_encode, random_results

CONFIG = CIPOConfig(train_batch_size=12, correction_batch_size=10, correction_rollouts=3,
                    retention_min_samples=2, retention_window=3, seed=11)
CONFIGS = [CONFIG, CIPOConfig(**{**CONFIG.to_dict(), "shaping_target": "reward"}),
           CIPOConfig(**{**CONFIG.to_dict(), "offline": True, "offline_collect_steps": 2})]


def fake_step(config: CIPOConfig, step: int):
    """One step's base results and a verifier of correction rollouts (the fake policy is seeded by the step)."""
    rng = random.Random(1000 + step)
    results = random_results(rng, config.train_batch_size, id_offset=(step % 3) * 5)

    def refine(picks) -> list[RolloutGroup]:
        groups = []
        for pick in picks:
            rollouts = []
            for _ in range(config.correction_rollouts):
                ok = rng.random() < (0.8 if pick.was_correct else 0.3)
                rollouts.append(Rollout([1, 2], rng.choice([0.0, 0.25]) + float(ok), correct=ok))
            groups.append(RolloutGroup(prompt_ids=[3, 4], rollouts=rollouts, prompt_id=pick.prompt_id))
        return groups

    return results, refine


def base_groups(results) -> list[RolloutGroup]:
    return [RolloutGroup([7], [Rollout([8], float(t.correct)) for t in r.trajectories]) for r in results]


def recipe_steps(config: CIPOConfig, steps: range) -> list[dict]:
    """The step as the trainers wrote it out before CorrectionStream: the components called by hand."""
    tracker = PassRateTracker(config.pass_rate_ema_decay)
    controller = ReplayController.from_config(config)
    pool = TrajectoryPool.from_config(config)
    selector = DifficultySelector.from_config(config)
    out = []
    for step in steps:
        results, refine = fake_step(config, step)
        tracker.update({r.prompt_id: [t.correct for t in r.trajectories] for r in results}, step)
        candidates = pool.candidates(results, step)
        selection = selector.select(candidates, config.correction_batch_size, controller.rho, step,
                                    pass_rates=tracker.pass_rates(config.pass_rate_source))
        prompts = build_correction_prompts(selection, candidates, config.template, encode=char_encode,
                                           decode=char_decode)
        groups = refine(selection.picks)
        for group, pick in zip(groups, selection.picks):
            group.conditioning_correct = pick.was_correct
        corr, shaping = shape_correction_groups(groups, config)
        c = shaping.counts
        decision = controller.update(c["correct_to_correct"], c["correct_to_correct"] + c["correct_to_incorrect"])
        batch = assemble_step(base_groups(results), corr, config)
        adv = step_advantages(batch, config, regression=shaping.regression)
        # the TRL trainer's correction-only advantages: float64 rewards, then A − α by hand
        shaped = torch.tensor([r.reward for g in corr for r in g.rollouts], dtype=torch.float64)
        alone = group_advantages(shaped, torch.arange(len(corr)).repeat_interleave(config.correction_rollouts))
        if config.shaping_target == "advantage":
            alone = shape_advantages(alone, shaping.regression, config.alpha)
        out.append({"picks": selection.picks, "prompts": prompts, "select": selection.metrics(),
                    "metrics": {**shaping.metrics(), **decision.metrics()}, "rho": controller.rho,
                    "adv": adv.tolist(), "corr_adv64": alone.float().tolist(),
                    "state": {"tracker": tracker.state_dict(), "controller": controller.state_dict(),
                              "pool": pool.state_dict()}})
    return out


def stream_steps(stream: CorrectionStream, steps: range) -> list[dict]:
    config = stream.config
    out = []
    for step in steps:
        results, refine = fake_step(config, step)
        proposal = stream.propose(results, step)
        outcome = stream.absorb(proposal, refine(proposal.picks))
        batch = assemble_step(base_groups(results), outcome.groups, config)
        adv = step_advantages(batch, config, regression=outcome.regression)
        corr_rows = batch.stream == 1
        assert torch.equal(outcome.advantages(config), adv[corr_rows])  # float32: the assembled batch's, exactly
        out.append({"picks": proposal.picks, "prompts": proposal.prompts, "select": proposal.metrics,
                    "metrics": outcome.metrics(), "rho": stream.rho, "adv": adv.tolist(),
                    "corr_adv64": outcome.advantages(config, dtype=torch.float64).float().tolist(),
                    "state": stream.state_dict()})
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=["advantage", "reward", "offline"])
def test_the_stream_is_the_recipe_bit_for_bit(config):
    want = recipe_steps(config, range(8))
    got = stream_steps(CorrectionStream(config, encode=char_encode, decode=char_decode), range(8))
    assert got == want
    assert any(step["metrics"]["shaping/correct_to_incorrect"] for step in got)  # regressions were shaped


@pytest.mark.parametrize("config", CONFIGS, ids=["advantage", "reward", "offline"])
def test_a_resumed_stream_continues_exactly(config):
    reference = stream_steps(CorrectionStream(config, encode=char_encode, decode=char_decode), range(8))
    first = CorrectionStream(config, encode=char_encode, decode=char_decode)
    head = stream_steps(first, range(4))
    state = json.loads(json.dumps(first.state_dict()))
    assert tuple(state) == STATE_KEYS
    resumed = CorrectionStream(config, encode=char_encode, decode=char_decode)
    resumed.load_state_dict({**state, "step": 4, "history": {}})  # a trainer checkpoint holds more keys
    assert head + stream_steps(resumed, range(4, 8)) == reference
    with pytest.raises(KeyError, match="pool"):
        resumed.load_state_dict({"tracker": state["tracker"], "controller": state["controller"]})


def test_an_inactive_stream_records_pass_rates_and_proposes_nothing():
    for config in (CIPOConfig(correction_enabled=False), CIPOConfig(correction_batch_size=0),
                   CIPOConfig(lambda_corr=0.0)):
        stream = CorrectionStream(config)
        results, _ = fake_step(config, 0)
        proposal = stream.propose(results[:4], 0)
        assert not proposal.picks and proposal.prompts == [] and proposal.metrics == {}
        assert len(stream.tracker) == 4 and stream.rho == config.rho_init
        with pytest.raises(ValueError, match="nothing to absorb"):
            stream.absorb(proposal, [])


def test_head_keeps_the_first_picks_and_the_full_selection_metrics():
    stream = CorrectionStream(CONFIG, encode=char_encode, decode=char_decode)
    results, refine = fake_step(CONFIG, 0)
    proposal = stream.propose(results, 0)
    assert len(proposal) == CONFIG.correction_batch_size
    short = proposal.head(3)
    assert short.picks == proposal.picks[:3] and short.prompts == proposal.prompts[:3]
    assert short.metrics == proposal.metrics and short.metrics["select/num_picks"] == len(proposal)
    with pytest.raises(ValueError, match="count"):
        proposal.head(len(proposal) + 1)
    with pytest.raises(ValueError, match="one group per pick"):
        stream.absorb(short, refine(proposal.picks))
    outcome = stream.absorb(short, refine(short.picks))
    assert [g.conditioning_correct for g in outcome.groups] == [p.was_correct for p in short.picks]
    assert sum(outcome.shaping.counts.values()) == 3 * CONFIG.correction_rollouts


def test_the_algorithm_package_imports_no_trainer():
    """Any trainer (cipo's, TRL's, verl's) can drive the stream: cipo.algorithm imports none of them."""
    package = Path(__file__).resolve().parents[2] / "cipo" / "algorithm"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [("." * node.level) + (node.module or "")] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not any(part in name.split(".") for part in ("trainer", "integrations", "trl", "verl")), \
                    f"{path.name} imports {name}"
