"""HFEngine (transformers ``generate``) against an fp32 HF forward; ``make_engine`` dispatch.

Measured on CPU (fp32): sampled-token logprobs agree with a no-cache forward to <= 1e-6 (<= 4e-6 after a weight
update); the tests allow 2e-5.
"""

import pytest
import torch

from cipo.models.tiny import build_tiny_model, load_tiny
from cipo.rollout import FINISH_LENGTH, FINISH_STOP, HFEngine, SamplingConfig, make_engine

from ._helpers import eos_only_model, max_logprob_error, prompts_for

TOL = 2e-5


@pytest.fixture(scope="module")
def hf(tiny_dir):
    return load_tiny(tiny_dir)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = make_engine("hf", tiny_dir, micro_batch=8)
    assert isinstance(eng, HFEngine)
    return eng


def test_shapes_and_finish(engine, hf):
    _, tok = hf
    prompts = prompts_for(tok)
    b = engine.generate(prompts, 4, SamplingConfig(max_tokens=12, seed=1))  # 3 micro-batches of 2 prompts
    assert len(b) == 12 and b.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
    for ids, lps, fin, text in zip(b.token_ids, b.logprobs, b.finish_reasons, b.texts):
        assert 1 <= len(ids) <= 12 and len(lps) == len(ids)
        assert (ids[-1] == tok.eos_token_id) == (fin == FINISH_STOP)
        assert (fin == FINISH_LENGTH) == (len(ids) == 12 and ids[-1] != tok.eos_token_id)
        assert text == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.0])
def test_logprobs_match_forward(engine, hf, temperature):
    model, tok = hf
    n = 1 if temperature == 0.0 else 3
    b = engine.generate(prompts_for(tok), n, SamplingConfig(temperature=temperature, max_tokens=16, seed=2))
    assert max_logprob_error(model, b) < TOL


def test_seed_reproducible_and_rng_untouched(engine, hf):
    _, tok = hf
    prompts = prompts_for(tok)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = engine.generate(prompts, 2, SamplingConfig(max_tokens=12, seed=7))
    assert torch.equal(torch.get_rng_state(), state)  # sampling does not consume the caller's RNG
    b = engine.generate(prompts, 2, SamplingConfig(max_tokens=12, seed=7))
    c = engine.generate(prompts, 2, SamplingConfig(max_tokens=12, seed=8))
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_update_weights(tiny_dir, hf):
    model, tok = hf
    eng = HFEngine(tiny_dir)  # own copy: this test changes its weights
    prompts = prompts_for(tok)
    sc = SamplingConfig(max_tokens=16, seed=3)
    before = eng.generate(prompts, 2, sc)
    other = build_tiny_model(None, tok, seed=123)
    eng.update_weights(other.named_parameters())
    after = eng.generate(prompts, 2, sc)
    assert after.token_ids != before.token_ids
    assert max_logprob_error(other, after) < TOL
    stop_model, changed = eos_only_model(other, tok.eos_token_id)
    eng.update_weights((n, p) for n, p in stop_model.named_parameters() if n in changed)
    stop = eng.generate(prompts, 2, sc)
    assert all(ids == [tok.eos_token_id] for ids in stop.token_ids) and set(stop.texts) == {""}
    with pytest.raises(KeyError, match="unknown parameter"):
        eng.update_weights([("model.nope.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        eng.update_weights([("lm_head.weight", torch.zeros(3, 3))])


def test_make_engine_dispatch(tiny_dir, monkeypatch):
    with pytest.raises(ValueError, match="unknown rollout engine"):
        make_engine("sglang", tiny_dir)
    import cipo.rollout as rollout

    monkeypatch.setattr(rollout, "vllm_available", lambda: False)
    assert isinstance(rollout.make_engine("auto", tiny_dir), HFEngine)
    with pytest.raises(ImportError, match="vllm is not installed"):
        rollout.make_engine("vllm", tiny_dir)


def test_sampling_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingConfig(max_tokens=0)
    with pytest.raises(ValueError, match="top-p/top-k"):
        SamplingConfig(top_k=20)
    sc = SamplingConfig(temperature=0.0)
    assert sc.greedy and sc.logprob_temperature == 1.0
    assert SamplingConfig(temperature=0.7).to_dict()["temperature"] == 0.7
