"""Pass-rate tracker: this step's rates, the EMA over history, checkpoint round trip."""

from __future__ import annotations

import json

import pytest

from cipo.algorithm import PassRateTracker


def test_step_rates_and_ema():
    tracker = PassRateTracker(ema_decay=0.5)
    rates = tracker.update({"a": [True, False, False, False], 7: [True] * 4}, step=0)
    assert rates == {"a": 0.25, 7: 1.0}
    assert tracker.pass_rate("a", "ema") == 0.25  # the first observation sets the EMA
    tracker.update({"a": [True, True, True, True]}, step=1)
    assert tracker.pass_rate("a", "step") == 1.0
    assert tracker.pass_rate("a", "ema") == pytest.approx(0.5 * 0.25 + 0.5 * 1.0)
    assert tracker.pass_rate(7, "step") is None  # not in the latest step
    assert tracker.pass_rate(7, "ema") == 1.0  # its history is kept
    assert tracker.pass_rate("unseen") is None
    stats = tracker.stats("a")
    assert (stats.num_observations, stats.num_samples, stats.num_correct, stats.last_step) == (2, 8, 5, 1)
    assert tracker.pass_rates("step") == {"a": 1.0}
    assert set(tracker.pass_rates("ema")) == {"a", 7}


def test_zero_decay_keeps_only_latest():
    tracker = PassRateTracker(ema_decay=0.0)
    tracker.update({1: [False, False]}, 0)
    tracker.update({1: [True, False]}, 1)
    assert tracker.pass_rate(1) == 0.5


def test_metrics():
    tracker = PassRateTracker()
    tracker.update({1: [True, True], 2: [False, False], 3: [True, False], 4: [True, True]}, 0)
    m = tracker.metrics()
    assert m["pass_rate/mean"] == pytest.approx(0.625)
    assert m["pass_rate/all_correct_frac"] == 0.5 and m["pass_rate/all_wrong_frac"] == 0.25


@pytest.mark.parametrize("decay", [-0.1, 1.0, True, "0.5"])
def test_invalid_decay(decay):
    with pytest.raises(ValueError, match="ema_decay"):
        PassRateTracker(ema_decay=decay)


def test_invalid_updates():
    tracker = PassRateTracker()
    with pytest.raises(ValueError, match="no responses"):
        tracker.update({1: []}, 0)
    with pytest.raises(ValueError, match="prompt ids"):
        tracker.update({(1, 2): [True]}, 0)
    with pytest.raises(ValueError, match="step"):
        tracker.update({1: [True]}, -1)
    with pytest.raises(ValueError, match="source"):
        tracker.pass_rate(1, "history")


def test_state_round_trip_through_json_keeps_ids_and_continues_identically():
    a = PassRateTracker(ema_decay=0.3)
    a.update({1: [True, False], "1": [False, False], "p": [True]}, 0)
    a.update({1: [True, True]}, 1)
    b = PassRateTracker(ema_decay=0.3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict()
    assert b.pass_rate(1) == a.pass_rate(1) and b.pass_rate("1") == a.pass_rate("1")  # int and str ids differ
    assert b.step_rates == a.step_rates
    for t in (a, b):
        t.update({1: [False, True], "p": [False]}, 2)
    assert b.state_dict() == a.state_dict()
