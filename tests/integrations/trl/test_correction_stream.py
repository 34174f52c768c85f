"""CIPO's correction stream on TRL's GRPOTrainer (CipoCorrectionGRPOTrainer)."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

from trl import GRPOTrainer  # noqa: E402

from cipo.algorithm import CIPOConfig  # noqa: E402
from cipo.integrations.trl import CipoCorrectionGRPOTrainer  # noqa: E402

from ._helpers import assert_same_run, run_grpo  # noqa: E402


def test_without_corrections_it_is_trl_dapo(tiny_model_dir, prompt_dataset, tmp_path):
    config = dict(loss_type="dapo", gradient_accumulation_steps=2, num_iterations=2)
    want = run_grpo(GRPOTrainer, tiny_model_dir, prompt_dataset, str(tmp_path / "trl"), **config)
    got = run_grpo(CipoCorrectionGRPOTrainer, tiny_model_dir, prompt_dataset, str(tmp_path / "cipo"),
                   trainer_kwargs={"cipo_config": CIPOConfig(correction_batch_size=0, correction_rollouts=4)},
                   **config)
    assert_same_run(got, want)


def test_correction_groups_are_built_sampled_and_trained(tiny_model_dir, prompt_dataset, tmp_path):
    lam = 0.5
    cfg = CIPOConfig(correction_batch_size=2, correction_rollouts=4, lambda_corr=lam, p_low=0.0, p_high=1.0,
                     rho_init=0.5, rho_max=0.5)
    got = run_grpo(CipoCorrectionGRPOTrainer, tiny_model_dir, prompt_dataset, str(tmp_path / "corr"), max_steps=3,
                   trainer_kwargs={"cipo_config": cfg, "correct_threshold": 0.5},
                   loss_type="dapo", gradient_accumulation_steps=1, num_iterations=1)
    # each generation: 4 base completions (1 prompt x 4), then 2 correction prompts x 4 refinements
    assert [len(c) for c in got.completions] == [4, 8] * 3
    for entry in got.logs:
        assert entry["cipo/corr/num_sequences"] == 8
        assert entry["cipo/select/num_picks"] == 2
        transitions = sum(entry[f"cipo/shaping/{k}"] for k in ("incorrect_to_correct", "incorrect_to_incorrect",
                                                                 "correct_to_correct", "correct_to_incorrect"))
        assert transitions == 8
        # one micro-batch per step: the logged loss is L_base + λ·L_corr
        assert entry["loss"] == pytest.approx(entry["cipo/loss/base"] + lam * entry["cipo/loss/corr"], abs=1e-6)
    assert any(entry["cipo/loss/corr"] != 0 for entry in got.logs)
    assert all("corr/reward" in entry for entry in got.logs)  # TRL's own metrics of the correction batch


def test_unsupported_settings_are_refused(tiny_model_dir, prompt_dataset, tmp_path):
    with pytest.raises(ValueError, match="loss_type='bnpo'"):
        run_grpo(CipoCorrectionGRPOTrainer, tiny_model_dir, prompt_dataset, str(tmp_path), loss_type="bnpo")
    with pytest.raises(ValueError, match="correction_rollouts=8"):
        run_grpo(CipoCorrectionGRPOTrainer, tiny_model_dir, prompt_dataset, str(tmp_path),
                 trainer_kwargs={"cipo_config": CIPOConfig(correction_rollouts=8)})
