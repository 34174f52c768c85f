"""Difficulty-aware selector: counts, band (window) edges, fallback, substitution, determinism."""

from __future__ import annotations

import random

import pytest

from cipo.algorithm import CIPOConfig, DifficultySelector, PassRateTracker

from .helpers import make_result, random_results


def test_rho_sets_the_success_share():
    results = [make_result(i, 4) for i in range(40)]  # pass rate 0.5: all in band
    sel = DifficultySelector().select(results, num_picks=32, rho=0.25, step=0)
    assert (sel.requested_success, sel.requested_failed) == (8, 24)
    assert sum(p.was_correct for p in sel.picks) == 8 and len(sel.picks) == 32
    assert all(p.reason == "in_band" and not p.substituted for p in sel.picks)
    for p in sel.picks:
        assert results[p.result_index].trajectories[p.trajectory_index].correct == p.was_correct
        assert p.prompt_id == results[p.result_index].prompt_id
    assert sel.metrics()["select/rho_effective"] == 0.25


@pytest.mark.parametrize("rho,expected", [(0.0, 0), (1.0, 10), (0.25, 3), (0.35, 4), (0.5, 5)])
def test_rounding_of_success_count(rho, expected):
    results = [make_result(i, 4) for i in range(10)]
    assert DifficultySelector().select(results, 10, rho, 0).requested_success == expected


def test_band_edges_are_inclusive():
    # pass rates 0, 1/8, …, 1: with the band [1/8, 7/8] exactly the mixed groups are in band.
    results = [make_result(i, i) for i in range(9)]
    selector = DifficultySelector(p_low=0.125, p_high=0.875)
    assert [selector.in_band(r.pass_rate) for r in results] == [False] + [True] * 7 + [False]
    sel = selector.select(results, num_picks=7, rho=0.0, step=0)
    assert {p.prompt_id for p in sel.picks} == set(range(1, 8))  # one failure from each in-band prompt first
    assert all(p.reason == "in_band" for p in sel.picks)
    narrow = DifficultySelector(p_low=0.375, p_high=0.375)  # a band of one value still includes it
    assert [narrow.in_band(r.pass_rate) for r in results] == [i == 3 for i in range(9)]
    assert not narrow.in_band(0.375 - 1e-6) and not narrow.in_band(0.375 + 1e-6)


def test_in_band_first_then_fallback():
    band = [make_result(i, 4) for i in range(3)]  # 3 prompts × 4 failures in band
    hard = [make_result(10 + i, 0) for i in range(5)]  # all wrong: out of band
    sel = DifficultySelector().select(band + hard, num_picks=20, rho=0.0, step=3)
    reasons = [p.reason for p in sel.picks]
    assert reasons == ["in_band"] * 12 + ["fallback"] * 8  # in-band exhausted before any fallback
    assert {p.prompt_id for p in sel.picks[:12]} == {0, 1, 2}
    assert sel.counts["failed_in_band"] == 12 and sel.counts["failed_fallback"] == 8


def test_round_robin_spreads_over_prompts():
    results = [make_result(i, 2) for i in range(10)]  # 6 failures each
    sel = DifficultySelector().select(results, num_picks=15, rho=0.0, step=0)
    first_round = [p.prompt_id for p in sel.picks[:10]]
    assert sorted(first_round) == list(range(10))  # every prompt once before any twice
    assert len({(p.prompt_id, p.trajectory_index) for p in sel.picks}) == 15  # no trajectory twice


def test_substitution_when_a_kind_runs_out():
    easy = [make_result(i, 8) for i in range(4)]  # only successes (32)
    sel = DifficultySelector().select(easy, num_picks=16, rho=0.25, step=0)
    assert len(sel.picks) == 16 and all(p.was_correct for p in sel.picks)
    assert sum(p.substituted for p in sel.picks) == 12 and sel.counts["substituted"] == 12
    hard = [make_result(i, 1) for i in range(2)]  # 2 successes, 14 failures
    sel = DifficultySelector().select(hard, num_picks=8, rho=0.5, step=0)
    assert sum(p.was_correct for p in sel.picks) == 2
    assert sum(p.substituted for p in sel.picks) == 2 and all(not p.was_correct for p in sel.picks if p.substituted)


def test_shortfall_when_candidates_are_too_few():
    sel = DifficultySelector().select([make_result(0, 1, num_total=3)], num_picks=10, rho=0.5, step=0)
    assert len(sel.picks) == 3 and sel.metrics()["select/shortfall"] == 7.0
    assert DifficultySelector().select([], 4, 0.5, 0).picks == []
    assert DifficultySelector().select([make_result(0, 4)], 0, 0.5, 0).picks == []


def test_deterministic_and_independent_of_global_rng():
    results = random_results(random.Random(1), 64)
    selector = DifficultySelector(seed=7)
    random.seed(123)
    state = random.getstate()
    a = selector.select(results, 48, 0.3, step=5)
    assert random.getstate() == state  # the global RNG is neither used nor advanced
    random.seed(999)
    b = DifficultySelector(seed=7).select(results, 48, 0.3, step=5)
    assert a.picks == b.picks
    assert DifficultySelector(seed=7).select(results, 48, 0.3, step=6).picks != a.picks
    assert DifficultySelector(seed=8).select(results, 48, 0.3, step=5).picks != a.picks


def test_pass_rates_from_the_tracker_window():
    """With ``pass_rate_source="ema"`` a prompt's history moves it into or out of the band."""
    tracker = PassRateTracker(ema_decay=0.5)
    tracker.update({0: [True] * 8, 1: [False] * 8}, step=0)
    results = [make_result(0, 0), make_result(1, 0)]  # both all-wrong this step
    tracker.update({r.prompt_id: [t.correct for t in r.trajectories] for r in results}, step=1)
    selector = DifficultySelector.from_config(CIPOConfig())
    by_ema = selector.select(results, 9, 0.0, 1, pass_rates=tracker.pass_rates("ema"))
    reasons = {(p.prompt_id, p.reason) for p in by_ema.picks}
    assert reasons == {(0, "in_band"), (1, "fallback")}  # prompt 0: EMA 0.5 (it used to be solved)
    assert [p.prompt_id for p in by_ema.picks] == [0] * 8 + [1]  # all 8 in-band failures before a fallback
    by_step = selector.select(results, 2, 0.0, 1, pass_rates=tracker.pass_rates("step"))
    assert all(p.reason == "fallback" for p in by_step.picks)
    assert by_ema.picks[0].pass_rate == 0.5


@pytest.mark.parametrize("kwargs,match", [({"p_low": -0.1}, "p_low"), ({"p_high": 1.1}, "p_high"),
                                          ({"p_low": 0.6, "p_high": 0.5}, "p_low"), ({"seed": 1.5}, "seed")])
def test_invalid_selector(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DifficultySelector(**kwargs)


def test_invalid_select_arguments():
    with pytest.raises(ValueError, match="num_picks"):
        DifficultySelector().select([], -1, 0.5, 0)
    with pytest.raises(ValueError, match="rho"):
        DifficultySelector().select([], 1, 1.5, 0)
