"""Replay controller (bounds; falling, stable, rising, dead-band traces; no-data steps; checkpoint) and the
offline trajectory pool."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cipo.algorithm import CIPOConfig, ReplayController, TrajectoryPool, least_squares_slope, retention

from .helpers import make_result

N = 100  # correct-conditioned rollouts per simulated step


def feed(controller: ReplayController, trace, n: int = N):
    """Feed exact retention values; returns the decisions."""
    return [controller.update(round(r * n), n) for r in trace]


def test_retention_and_slope_helpers():
    assert retention(3, 4) == 0.75 and retention(0, 0) is None
    with pytest.raises(ValueError):
        retention(5, 4)
    assert least_squares_slope([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert least_squares_slope([0.5]) == 0.0
    assert least_squares_slope([0.9, 0.8, 0.9, 0.8]) == pytest.approx(-0.02)


def test_falling_trace_raises_rho_to_the_bound():
    c = ReplayController(rho_init=0.25, rho_max=0.5, step_up=0.05, window=5)
    decisions = feed(c, [0.95 - 0.02 * t for t in range(30)])
    assert c.rho == 0.5
    # The slope rule fires while the level is still above the target (an early warning).
    first_raise = next(d for d in decisions if d.rho > 0.25)
    assert first_raise.action == "declining" and first_raise.level >= c.target
    assert decisions[-1].action == "below_target" and all(d.rho <= 0.5 for d in decisions)


def test_stable_high_trace_lowers_rho_to_the_bound_after_a_full_window():
    c = ReplayController(rho_init=0.3, rho_min=0.1, step_down=0.025, window=5)
    decisions = feed(c, [0.95] * 30)
    assert [d.action for d in decisions[:4]] == ["hold"] * 4  # no slope before the window is full
    assert decisions[4].action == "stable_high"
    assert c.rho == pytest.approx(0.1) and min(d.rho for d in decisions) >= 0.1


def test_rising_trace_raises_then_holds_then_lowers():
    c = ReplayController(rho_init=0.25, window=5)
    trace = [0.6] * 5 + [0.6 + 0.05 * t for t in range(1, 8)] + [0.95] * 20
    decisions = feed(c, trace)
    actions = [d.action for d in decisions]
    # Three phases, in order: raise while below target, hold while high but still rising, lower once stable.
    first_hold = actions.index("hold")
    first_lower = actions.index("stable_high")
    assert set(actions[:first_hold]) == {"below_target"} and 0 < first_hold < first_lower
    rising_high = [d for d in decisions[first_hold:first_lower] if d.level >= c.high]
    assert rising_high and all(d.action == "hold" and d.slope > c.slope_tol for d in rising_high)
    assert set(actions[first_lower:]) == {"stable_high"}
    assert decisions[first_hold - 1].rho == 0.5 and c.rho < 0.5


def test_dead_band_holds():
    c = ReplayController(rho_init=0.3, window=5)
    decisions = feed(c, [0.85] * 20)
    assert {d.action for d in decisions} == {"hold"} and c.rho == 0.3


def test_no_data_holds_and_changes_nothing():
    c = ReplayController(window=3, min_samples=8)
    feed(c, [0.9, 0.9])
    before = c.state_dict()
    for retained, total in [(0, 0), (3, 5), (7, 7)]:
        d = c.update(retained, total)
        assert d.action == "no_data" and d.rho == before["rho"]
    after = c.state_dict()
    assert after["level"] == before["level"] and after["history"] == before["history"]
    assert after["num_updates"] == before["num_updates"] + 3


@settings(max_examples=60, deadline=None)
@given(trace=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), max_size=60),
       bounds=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_rho_stays_in_bounds(trace, bounds):
    lo, hi = sorted(bounds)
    c = ReplayController(rho_init=lo, rho_min=lo, rho_max=hi, step_up=0.3, step_down=0.3, window=2,
                         min_samples=1)
    for a, b in trace:
        d = c.update(min(a, b), max(a, b))
        assert lo <= d.rho <= hi and lo <= c.rho <= hi


def test_invalid_controller():
    for kwargs in ({"rho_init": 0.6, "rho_max": 0.5}, {"rho_min": 0.3, "rho_init": 0.2}, {"target": 0.9, "high": 0.8},
                   {"window": 1}, {"ema_decay": 1.0}, {"min_samples": 0}, {"step_up": -0.1}, {"slope_tol": -1}):
        with pytest.raises(ValueError):
            ReplayController(**kwargs)


def test_checkpoint_round_trip_continues_identically():
    rng = random.Random(0)
    trace = [min(1.0, max(0.0, 0.85 + rng.gauss(0, 0.08) - 0.004 * t)) for t in range(60)]
    full = ReplayController.from_config(CIPOConfig())
    part = ReplayController.from_config(CIPOConfig())
    feed(full, trace[:25])
    feed(part, trace[:25])
    resumed = ReplayController.from_config(CIPOConfig())
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    assert resumed.state_dict() == full.state_dict()
    assert [d.rho for d in feed(resumed, trace[25:])] == [d.rho for d in feed(full, trace[25:])]
    assert resumed.state_dict() == full.state_dict()


def test_load_clips_rho_to_new_bounds():
    c = ReplayController(rho_init=0.5, rho_max=0.5)
    narrow = ReplayController(rho_init=0.2, rho_max=0.3)
    narrow.load_state_dict(c.state_dict())
    assert narrow.rho == 0.3


def test_decision_metrics():
    c = ReplayController(window=2)
    m = c.update(90, 100).metrics()
    assert m["replay/rho"] == 0.25 and m["replay/retention"] == 0.9 and "replay/slope" not in m


# ---------------------------------------------------------------------------------------------- offline pool


def test_online_pool_passes_step_results_through():
    pool = TrajectoryPool(offline=False)
    results = [make_result(i, 3) for i in range(3)]
    assert pool.candidates(results, 0) == results and len(pool) == 0


def test_offline_pool_freezes_after_collect_steps():
    pool = TrajectoryPool.from_config(CIPOConfig(offline=True, offline_collect_steps=2))
    step0 = [make_result(i, 3) for i in range(3)]
    assert [r.prompt_id for r in pool.candidates(step0, 0)] == [0, 1, 2]
    assert [r.prompt_id for r in pool.candidates(step0, 0)] == [0, 1, 2]  # the same step is not added twice
    assert not pool.frozen
    step1 = [make_result(2, 8), make_result(3, 0)]
    assert [r.prompt_id for r in pool.candidates(step1, 1)] == [0, 1, 2, 3]
    assert pool.frozen
    assert pool.candidates(step1, 1)[2].pass_rate == 1.0  # a re-collected prompt keeps its latest trajectories
    later = pool.candidates([make_result(99, 4)], 2)
    assert [r.prompt_id for r in later] == [0, 1, 2, 3]  # frozen: new trajectories never enter
    step1[0].trajectories[0].text = "mutated by the caller"
    assert pool.candidates([], 3)[2].trajectories[0].text != "mutated by the caller"  # the pool holds copies


def test_offline_pool_checkpoint_round_trip():
    pool = TrajectoryPool(offline=True, collect_steps=1)
    first = [make_result(5, 2), make_result("x", 6, prompt=None)]
    first[0].trajectories[0].token_ids = [1, 2, 3]
    first[1].prompt = [{"role": "user", "content": "chat prompt"}]
    pool.candidates(first, 0)
    restored = TrajectoryPool(offline=True, collect_steps=1)
    restored.load_state_dict(json.loads(json.dumps(pool.state_dict())))
    assert restored.frozen and restored.state_dict() == pool.state_dict()
    assert restored.candidates([make_result(9, 1)], 1) == pool.candidates([], 1)
