"""TRL's own GRPOTrainer against cipo's subclass: same rollouts, losses, grad norms and weights (≤1e-5 relative).

Every run trains the same tiny Qwen3 from the same seed on CPU in fp32 with SGD (Adam would turn rounding-level
gradient differences of near-zero entries into ±lr steps). ``learning_rate`` is large enough that the second
iteration over a batch (num_iterations=2) clips a share of the tokens, which the tests check happens.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

from trl import GRPOTrainer  # noqa: E402

from cipo.integrations.trl import CipoGRPOTrainer  # noqa: E402

from ._helpers import assert_same_run, run_grpo  # noqa: E402

# (loss_type, gradient_accumulation_steps, num_iterations): every mapped loss_type at (1, 1) and (2, 2), plus the
# two mixed settings on the loss types whose normaliser depends on them.
CASES = [(lt, 1, 1) for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")] + \
        [(lt, 2, 2) for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")] + \
        [("dapo", 1, 2), ("grpo", 2, 1)]


@pytest.mark.parametrize("loss_type,grad_accum,num_iterations", CASES)
def test_cipo_loss_and_head_match_trl(tiny_model_dir, prompt_dataset, tmp_path, loss_type, grad_accum,
                                      num_iterations):
    config = dict(loss_type=loss_type, gradient_accumulation_steps=grad_accum, num_iterations=num_iterations)
    want = run_grpo(GRPOTrainer, tiny_model_dir, prompt_dataset, str(tmp_path / "trl"), **config)
    got = run_grpo(CipoGRPOTrainer, tiny_model_dir, prompt_dataset, str(tmp_path / "cipo"),
                   trainer_kwargs={"cipo_loss": True}, **config)
    assert_same_run(got, want)
    assert any(loss != 0 for loss in want.losses)
    if num_iterations > 1:  # the ratio moved away from 1 and the clip is exercised
        clipped = [entry["clip_ratio/region_mean"] for entry in want.logs]
        assert max(clipped) > 0.05, clipped
        assert [entry["cipo/clipfrac"] for entry in got.logs] == pytest.approx(clipped, abs=1e-6)


def test_every_mapped_knob_matches_trl(tiny_model_dir, prompt_dataset, tmp_path):
    """Clip-higher, two-sided clip (delta), KL to a reference model, entropy bonus, high-entropy token mask,
    off-policy sequence mask, truncated-completion masking and a sampling temperature, all at once. (Whether
    delta's clip engages depends on the run; test_loss_on_crafted_batch makes it engage.)"""
    config = dict(loss_type="dapo", gradient_accumulation_steps=2, num_iterations=2, learning_rate=0.3,
                  epsilon=0.2, epsilon_high=0.28, delta=1.3, beta=0.05, use_bias_correction_kl=False,
                  entropy_coef=0.01, top_entropy_quantile=0.5, off_policy_mask_threshold=0.01,
                  mask_truncated_completions=True, temperature=0.8)
    want = run_grpo(GRPOTrainer, tiny_model_dir, prompt_dataset, str(tmp_path / "trl"), **config)
    got = run_grpo(CipoGRPOTrainer, tiny_model_dir, prompt_dataset, str(tmp_path / "cipo"),
                   trainer_kwargs={"cipo_loss": True}, **config)
    assert_same_run(got, want)
    assert max(entry["clip_ratio/region_mean"] for entry in want.logs) > 0.05
    assert [entry["kl"] for entry in got.logs] == pytest.approx([entry["kl"] for entry in want.logs], rel=1e-5)
    assert [entry["entropy"] for entry in got.logs] == pytest.approx([e["entropy"] for e in want.logs], rel=1e-5)

    # cipo's head under TRL's own loss: the same numbers again
    head_only = run_grpo(CipoGRPOTrainer, tiny_model_dir, prompt_dataset, str(tmp_path / "head"), **config)
    assert_same_run(head_only, want)
