"""PolicyLossConfig: defaults, accepted spellings, and a clear error for every invalid value."""

from __future__ import annotations

import math

import pytest

from cipo import PolicyLossConfig


def test_defaults_are_verls():
    cfg = PolicyLossConfig()
    assert (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c) == (0.2, 0.2, 3.0)
    assert cfg.loss_agg_mode == "token-mean" and cfg.kl_type == "low_var_kl" and cfg.kl_estimator == "k3"
    assert cfg.tis_mode is None and cfg.tis_cap == 2.0 and cfg.temperature == 1.0


@pytest.mark.parametrize("spelling, canonical", [("k1", "k1"), ("kl", "k1"), ("k2", "k2"), ("mse", "k2"),
                                                 ("k3", "k3"), ("low_var_kl", "k3"), ("abs", "abs"),
                                                 ("k1+", "k1+"), ("kl+", "k1+"), ("k2+", "k2"), ("mse+", "k2"),
                                                 ("k3+", "k3+"), ("low_var_kl+", "k3+"), ("abs+", "abs+")])
def test_kl_spellings(spelling: str, canonical: str):
    assert PolicyLossConfig(kl_type=spelling).kl_estimator == canonical


@pytest.mark.parametrize(
    "field, value",
    [
        ("clip_ratio_low", -0.1), ("clip_ratio_low", 1.0), ("clip_ratio_low", math.nan), ("clip_ratio_low", "0.2"),
        ("clip_ratio_high", -0.01), ("clip_ratio_high", math.inf),
        ("clip_ratio_c", 1.0), ("clip_ratio_c", 0.5), ("clip_ratio_c", True),
        ("loss_agg_mode", "mean"), ("loss_scale_factor", 0.0), ("loss_scale_factor", -3),
        ("kl_coef", -1e-3), ("kl_type", "k4"), ("entropy_coef", -0.1),
        ("tis_mode", "tokens"), ("tis_cap", 0.0), ("temperature", 0.0), ("temperature", -1.0),
    ],
)
def test_invalid_values_name_the_field(field: str, value: object):
    with pytest.raises(ValueError, match=rf"PolicyLossConfig\.{field} must be"):
        PolicyLossConfig(**{field: value})


def test_dual_clip_can_be_disabled():
    assert PolicyLossConfig(clip_ratio_c=None).clip_ratio_c is None


def test_from_dict_round_trip_and_unknown_key():
    cfg = PolicyLossConfig(clip_ratio_high=0.28, tis_mode="sequence")
    assert PolicyLossConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown PolicyLossConfig key.*clip_ratio'"):
        PolicyLossConfig.from_dict({"clip_ratio": 0.2})
