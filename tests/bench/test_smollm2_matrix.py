"""The SmolLM2 setting matrix and loss shapes (bench/smollm2_matrix.py, bench/loss_suite.py --part smollm2): what they
would run, without running a model (the runs themselves are benchmarks, minutes each)."""

from __future__ import annotations

from bench.loss_suite import plan
from bench.smollm2_matrix import SETTINGS, markdown, study_budget
from bench.study.arms import SMOLLM2


def test_matrix_runs_the_study_budget_with_each_lever_switched():
    budget = study_budget()
    assert budget == [o for o in SMOLLM2 if "lora" not in o and not o.startswith("actor.lr=")]
    assert "rollout.max_response_length=64" in budget and not any("lora" in o for o in budget)
    names = [name for name, _, _ in SETTINGS]
    assert len(set(names)) == len(names) == 5
    overrides = {name: set(o) for name, o, _ in SETTINGS}
    assert overrides["fp32, full, shared prefix"] == set()  # the config's own levers
    assert overrides["fp32, full, no shared prefix"] == {"actor.shared_prefix=false"}
    assert "actor.lora.rank=16" in overrides["fp32, LoRA r16, shared prefix"]
    assert {"model.dtype=bfloat16", "actor.lora.rank=16"} <= overrides["bf16, LoRA r16, shared prefix"]


def test_matrix_table_shows_failed_settings():
    ok = {"setting": "a", "step_s": 10.0, "rollout_s": 4.0, "sampled_tokens": 400.0, "rollout_tokens_per_s": 100.0,
          "update_s": 6.0, "tokens_forward": 600.0, "train_tokens_per_s": 100.0, "peak_rss_gib": 2.5}
    text = markdown({"rows": [ok, {"setting": "b", "exit": 1, "peak_rss_gib": 0.1}]})
    assert "| a | 10.0 | 4.0 | 400 | 100 | 6.0 | 600 | 100 | 2.50 |" in text
    assert "| b | failed (exit 1) |" in text


def test_loss_plan_for_smollm2s_tied_head():
    shapes, error = plan("cpu", "smollm2", quick=False)
    assert {(s.tokens, s.hidden, s.vocab, s.dtype) for s in shapes} == {
        (1024, 576, 49152, "float32"), (4096, 576, 49152, "float32"), (256, 576, 49152, "bfloat16")}
    assert all(s.methods[0] == "naive" and "fused" in s.methods for s in shapes)
    assert (error.hidden, error.vocab) == (576, 49152)
    quick, _ = plan("cpu", "smollm2", quick=True)
    assert {s.tokens for s in quick} == {1024, 256}
