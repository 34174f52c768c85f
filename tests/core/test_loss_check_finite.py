"""The loss API's opt-in ``check_finite``: a NaN/inf in a loss token of any input raises, naming the tensor and
the position; values outside the mask never do; off by default (NaN flows through, as before)."""

from __future__ import annotations

import math

import pytest
import torch

from cipo import PackedBatch, PolicyLossConfig, SequenceSample, cipo_policy_loss, policy_loss
from cipo.fused_loss import fused_linear_policy_loss
from cipo.loss import NonFiniteError

CFG = PolicyLossConfig()


def padded(**overrides):
    logp = torch.full((2, 3), -1.0, dtype=torch.float64)
    inputs = dict(logp=logp, old_logp=logp.clone(), advantages=torch.tensor([1.0, -1.0], dtype=torch.float64),
                  mask=torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    inputs.update(overrides)
    return inputs


@pytest.mark.parametrize("name", ["logp", "old_logp"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_policy_loss_names_the_tensor_and_position(name: str, bad: float):
    inputs = padded()
    inputs[name] = inputs[name].clone()
    inputs[name][1, 2] = bad
    with pytest.raises(NonFiniteError, match=rf"policy_loss: {name} \(shape \(2, 3\)\) holds 1 non-finite .* "
                                             r"at index \(1, 2\)"):
        policy_loss(**inputs, config=CFG, check_finite=True)
    policy_loss(**inputs, config=CFG)  # default: no check (it would synchronise), no error


def test_policy_loss_advantages_and_masked_values():
    with pytest.raises(NonFiniteError, match="advantages"):
        policy_loss(**padded(advantages=torch.tensor([1.0, math.nan], dtype=torch.float64)), config=CFG,
                    check_finite=True)
    inputs = padded()
    inputs["logp"] = inputs["logp"].clone()
    inputs["logp"][0, 2] = math.nan  # outside the mask: zeroed, cannot leak, not an error
    loss, _ = policy_loss(**inputs, config=CFG, check_finite=True)
    assert math.isfinite(float(loss))


def joint_batch() -> PackedBatch:
    seqs = [SequenceSample([1, 2], [3, 4, 5], float(k % 2), 0, 0, old_logp=[-1.0, -1.2, -0.5]) for k in range(4)]
    return PackedBatch.from_sequences(seqs)


def test_cipo_policy_loss_names_ref_logp():
    batch = joint_batch()
    logp = batch.old_logp.clone().double()
    batch.ref_logp = batch.old_logp.clone()
    batch.ref_logp[batch.loss_mask.nonzero()[0, 0]] = math.inf
    with pytest.raises(NonFiniteError, match="cipo_policy_loss: ref_logp"):
        cipo_policy_loss(logp, batch, PolicyLossConfig(kl_coef=0.1), check_finite=True)


def test_fused_loss_names_a_nan_hidden_row():
    torch.manual_seed(0)
    batch = joint_batch()
    hidden = torch.randn(batch.num_tokens, 8, dtype=torch.float64)
    weight = torch.randn(11, 8, dtype=torch.float64)
    loss, _ = fused_linear_policy_loss(hidden, weight, batch, CFG, check_finite=True)
    assert math.isfinite(float(loss))
    hidden[0, 3] = math.nan  # a prompt row: not in the loss, but its NaN reaches the whole weight gradient
    with pytest.raises(NonFiniteError, match=r"fused_linear_policy_loss: hidden .* at index \(0, 3\)"):
        fused_linear_policy_loss(hidden, weight, batch, CFG, check_finite=True)
