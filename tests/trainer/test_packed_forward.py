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
