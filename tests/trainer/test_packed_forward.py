"""The packed forward isolates sequences exactly: equal to running each sequence alone."""

from __future__ import annotations

import pytest
import torch

from cipo import PackedBatch, SequenceSample
from cipo.models.tiny import build_tiny_model, build_tiny_tokenizer
from cipo.trainer.forward import lm_head_weight, packed_hidden_states


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    m = build_tiny_model(tokenizer=tok, seed=0, num_hidden_layers=2)
    return m.eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_per_sequence(model, attn: str):
    model.config._attn_implementation = attn
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    seqs = [SequenceSample(torch.randint(0, vocab, (p,), generator=g).tolist(),
                           torch.randint(0, vocab, (r,), generator=g).tolist(), 0.0, 0)
            for p, r in [(3, 5), (1, 0), (7, 2), (2, 9), (1, 1)]]
    batch = PackedBatch.from_sequences(seqs)
    with torch.no_grad():
        packed = packed_hidden_states(model, batch.input_ids, batch.position_ids)
        for s, (start, end) in enumerate(zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist())):
            alone = packed_hidden_states(model, batch.input_ids[start:end], torch.arange(end - start))
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-5, atol=1e-5, msg=f"sequence {s}")
    assert packed.shape == (batch.num_tokens, model.config.hidden_size)
    assert lm_head_weight(model).shape == (vocab, model.config.hidden_size)


def test_shape_errors(model):
    with pytest.raises(ValueError, match=r"must both be \[N\]"):
        packed_hidden_states(model, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


def _two_stream_batch(vocab: int) -> PackedBatch:
    from cipo import CORRECTION_STREAM

    g = torch.Generator().manual_seed(2)
    seqs = [SequenceSample(torch.randint(0, vocab, (p,), generator=g).tolist(),
                           torch.randint(0, vocab, (r,), generator=g).tolist(), float(k % 2), group,
                           stream=CORRECTION_STREAM if group else 0)
            for k, (p, r, group) in enumerate([(3, 5, 0), (2, 4, 0), (4, 3, 1), (4, 6, 1)])]
    return PackedBatch.from_sequences(seqs)


def test_unfused_path_is_the_materialised_reference_and_agrees_with_the_fused_loss(model):
    """``actor.fused_loss: false``: ``materialized_policy_loss`` is the fp32 logits → log-softmax → gather written
    out (bit for bit, ignored rows aside, which the loss masks), and agrees with the fused loss."""
    from cipo import PolicyLossConfig, cipo_policy_loss
    from cipo.trainer.backend import PolicyModule

    batch = _two_stream_batch(model.config.vocab_size)
    cfg = PolicyLossConfig(temperature=0.7, kl_coef=0.1)
    module = PolicyModule(model)
    with torch.no_grad():
        batch.ref_logp = module(batch, cfg, logp_only=True) - 0.01 * batch.loss_mask.float()
    runs = {}
    for name in ("fused", "unfused", "written_out"):
        model.zero_grad(set_to_none=True)
        if name == "written_out":
            hidden = packed_hidden_states(model, batch.input_ids, batch.position_ids)
            logits = (hidden.float() @ lm_head_weight(model).float().t()) / cfg.temperature
            logp = torch.log_softmax(logits, dim=-1).gather(1, batch.targets.clamp(min=0)[:, None])[:, 0]
            batch.old_logp = logp.detach()
            loss, _ = cipo_policy_loss(logp, batch, cfg, lambda_corr=0.5)
            batch.old_logp = None
        else:
            loss, _ = module(batch, cfg, fused=name == "fused", lambda_corr=0.5)
        loss.backward()
        runs[name] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    assert torch.equal(runs["unfused"][0], runs["written_out"][0])
    for a, b in zip(runs["unfused"][1], runs["written_out"][1]):
        assert torch.equal(a, b)
    torch.testing.assert_close(runs["fused"][0], runs["unfused"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(runs["fused"][1], runs["unfused"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_unfused_path_has_the_entropy_metric_and_bonus_of_the_fused_loss(model):
    """``actor.fused_loss: false`` with ``entropy_coef > 0`` (an error before: the unfused path had no entropy):
    loss, gradients and the ``entropy`` metric agree with the fused loss."""
    from cipo import PolicyLossConfig
    from cipo.trainer.backend import PolicyModule

    batch = _two_stream_batch(model.config.vocab_size)
    cfg = PolicyLossConfig(temperature=0.7, entropy_coef=0.05)
    module = PolicyModule(model)
    runs = {}
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        loss, metrics = module(batch, cfg, fused=fused, lambda_corr=0.5)
        loss.backward()
        runs[fused] = (loss.detach(), metrics, [p.grad.clone() for p in model.parameters()])
    assert runs[False][1]["entropy"] > 0
    assert runs[False][1]["entropy"] == pytest.approx(runs[True][1]["entropy"], rel=1e-5)
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(runs[True][2], runs[False][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
