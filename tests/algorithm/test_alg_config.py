"""CIPOConfig: paper defaults, validation naming the field, (de)serialisation, documentation coverage."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from cipo.algorithm import CIPOConfig, CorrectionTemplate

DOC = Path(__file__).resolve().parents[2] / "docs" / "ALGORITHM.md"


def test_paper_settings_are_the_defaults():
    c = CIPOConfig()
    assert (c.train_batch_size, c.rollouts_per_prompt) == (128, 8)
    assert (c.correction_batch_size, c.correction_rollouts) == (128, 8)
    assert c.lambda_corr == 1.0 and c.correction_active and not c.offline


@pytest.mark.parametrize("field,value", [
    ("correction_enabled", 1), ("lambda_corr", -0.1), ("lambda_corr", float("nan")), ("train_batch_size", 0),
    ("rollouts_per_prompt", 2.0), ("correction_batch_size", -1), ("correction_rollouts", 0), ("rho_min", -0.1),
    ("rho_max", 1.5), ("rho_init", 0.05), ("rho_init", 0.9), ("rho_step_up", 2.0), ("rho_step_down", -0.5),
    ("retention_target", 1.1), ("retention_high", 0.5), ("retention_window", 1), ("retention_slope_tol", -1.0),
    ("retention_ema_decay", 1.0), ("retention_min_samples", 0), ("alpha", -1.0), ("shaping_target", "logits"),
    ("p_low", -0.5), ("p_high", 0.1), ("pass_rate_source", "history"), ("pass_rate_ema_decay", 1.0),
    ("template", "neutral"), ("offline", "yes"), ("offline_collect_steps", 0), ("seed", 0.5),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"CIPOConfig\.{field} must be"):
        CIPOConfig(**{field: value})


def test_cross_field_bounds_name_the_range():
    with pytest.raises(ValueError, match=r"rho_init must be a float in \[rho_min=0.3, rho_max=0.5\]"):
        CIPOConfig(rho_min=0.3, rho_init=0.2)
    with pytest.raises(ValueError, match=r"p_high must be a float in \[p_low=0.6, 1\]"):
        CIPOConfig(p_low=0.6, p_high=0.5)


@pytest.mark.parametrize("kwargs,active", [({}, True), ({"correction_enabled": False}, False),
                                           ({"lambda_corr": 0.0}, False), ({"correction_batch_size": 0}, False)])
def test_correction_active(kwargs, active):
    assert CIPOConfig(**kwargs).correction_active is active


def test_dict_round_trip_with_nested_template():
    c = CIPOConfig(alpha=0.3, template=CorrectionTemplate(max_attempt_tokens=512, system="Be thorough."))
    d = json.loads(json.dumps(c.to_dict()))
    assert d["template"]["max_attempt_tokens"] == 512
    assert CIPOConfig.from_dict(d) == c
    assert isinstance(CIPOConfig.from_dict(d).template, CorrectionTemplate)
    with pytest.raises(ValueError, match="unknown CIPOConfig key"):
        CIPOConfig.from_dict({"lambda": 1.0})
    with pytest.raises(ValueError, match="unknown CorrectionTemplate key"):
        CIPOConfig.from_dict({"template": {"wording": "x"}})


def test_every_knob_is_documented():
    text = DOC.read_text(encoding="utf-8")
    for f in list(fields(CIPOConfig)) + list(fields(CorrectionTemplate)):
        assert f"`{f.name}`" in text, f"docs/ALGORITHM.md does not discuss {f.name}"
    for image in re.findall(r"\]\((img/[^)]+)\)", text):
        assert (DOC.parent / image).is_file(), image
    assert "img/replay_controller.png" in text
