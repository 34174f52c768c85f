"""HFEngine (transformers ``generate``) against an fp32 HF forward; ``make_engine`` dispatch.

Measured on CPU (fp32): sampled-token logprobs agree with a no-cache forward to <= 1e-6 (<= 4e-6 after a weight
update); the tests allow 2e-5. Seeded sampling is batch invariant (prompt i of a call seeded with s is sampled
as if seeded with s + i alone) and follows the temperature / top-k / top-p distribution (chi-square tests).
"""

import pytest
import torch

from cipo.models.tiny import build_tiny_model
from cipo.rollout import FINISH_LENGTH, FINISH_STOP, HFEngine, SamplingConfig, make_engine
from tests._tiny import load_tiny

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


# --- batch-invariant seeded sampling ---------------------------------------------------------------------------

EXPRS = ("12+34", "505+7", "9+990", "1+1", "77+777", "3+45")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_seeded_sampling_is_batch_invariant(hf, temperature):
    """Prompt i of a call seeded with s is sampled as if seeded with s + i, whatever else is in the call."""
    model, tok = hf
    prompts = prompts_for(tok, EXPRS)  # different lengths: the left padding differs between the splits below
    n, s, k = 3, 11, 2
    sc = lambda seed: SamplingConfig(temperature=temperature, max_tokens=16, seed=seed)  # noqa: E731
    whole = HFEngine(model=model, tokenizer=tok, micro_batch=1024).generate(prompts, n, sc(s))
    split = HFEngine(model=model, tokenizer=tok, micro_batch=n).generate(prompts, n, sc(s))  # 1 prompt per call
    tail = HFEngine(model=model, tokenizer=tok, micro_batch=2 * n).generate(prompts[k:], n, sc(s + k))
    assert len(set(map(tuple, whole.token_ids))) > n  # actually random: not all samples equal
    for other, off in ((split, 0), (tail, k * n)):
        assert other.token_ids == whole.token_ids[off:]
        for a, b in zip(other.logprobs, whole.logprobs[off:]):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    assert max_logprob_error(model, whole) < TOL


def fixed_logits_model(model, logits: torch.Tensor):
    """Modify ``model`` in place so that it predicts ``logits`` (``[V]``) at every position; return it.

    As in ``eos_only_model``: the last hidden state becomes the same vector ``c * e_0`` for every token, and
    column 0 of the LM head holds ``logits / c``.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, 0] = 1.0
        model.model.norm.weight.fill_(1.0)
        hidden = model.model.norm(emb[:1])[0, 0]  # RMS-normed unit vector: sqrt(hidden_size) at dim 0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = logits / hidden
    return model


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """``[V]`` sampling distribution of ``SamplingConfig`` semantics: softmax(logits / T) restricted to the top-k
    tokens, then to the smallest most-likely set of mass >= top_p, renormalised (float64)."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[: top_k if top_k > 0 else len(p)]] = True
    p = torch.where(keep, p, 0.0) / p[keep].sum()
    mass_before = p[order].cumsum(0) - p[order]
    keep[order[mass_before >= top_p]] = False
    return torch.where(keep, p, 0.0) / p[keep].sum()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of ``counts`` (``[V]``) against ``probs`` and its degrees of freedom. Tokens expected
    fewer than 5 times are pooled into one bin; counts where ``probs`` is 0 give inf."""
    expected = counts.sum() * probs.double()
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].sum().double()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] == 0:
        if obs[-1] > 0:
            return float("inf"), int(big.sum()) - 1
        obs, exp = obs[:-1], exp[:-1]
    return ((obs - exp) ** 2 / exp).sum().item(), len(exp) - 1


def p_value(stat: float, df: int) -> float:
    """P(chi2(df) >= stat)."""
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)).item()


@pytest.fixture(scope="module")
def fixed_logits_engine(tiny_dir, hf):
    """An engine whose model predicts the same ``[V]`` logits (N(0, 2^2) draws) after any prefix."""
    model = load_tiny(tiny_dir)[0]
    logits = 2.0 * torch.randn(model.config.vocab_size, generator=torch.Generator().manual_seed(5))
    return HFEngine(model=fixed_logits_model(model, logits), tokenizer=hf[1], micro_batch=1 << 16), logits


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(0.7, -1, 1.0), (1.6, -1, 1.0), (1.3, 12, 1.0), (0.8, -1, 0.75), (1.5, 15, 0.9)],
)
def test_seeded_sampling_distribution(fixed_logits_engine, temperature, top_k, top_p):
    """First tokens of 4000 seeded samples of one prompt (1000 copies x n=4; copy i is seeded with s + i) follow
    the warped softmax; the same chi-square test rejects the distributions of a sampler that ignores T, top-k or
    top-p."""
    eng, logits = fixed_logits_engine
    sc = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=1, seed=123,
                        return_logprobs=top_k <= 0 and top_p >= 1.0)
    b = eng.generate([eng.tokenizer.encode("1+1=")] * 1000, 4, sc)
    counts = torch.bincount(torch.tensor([ids[0] for ids in b.token_ids]), minlength=len(logits))
    want = reference_probs(logits, temperature, top_k, top_p)
    assert counts[want == 0].sum() == 0  # truncated tokens are never sampled
    assert p_value(*chi_square(counts, want)) > 1e-4
    # The same data rule out a sampler that ignores T, top-k or top-p (where that changes the distribution).
    for wrong in ((1.0, top_k, top_p), (temperature, -1, top_p), (temperature, top_k, 1.0)):
        q = reference_probs(logits, *wrong)
        if not torch.allclose(q, want):
            assert p_value(*chi_square(counts, q)) < 1e-12


def test_unseeded_sampling_advances_global_rng(engine, hf):
    """seed=None draws from (and advances) the global RNG: two calls in a row differ."""
    _, tok = hf
    prompts = prompts_for(tok)
    sc = SamplingConfig(max_tokens=12)
    torch.manual_seed(0)
    a = engine.generate(prompts, 2, sc)
    b = engine.generate(prompts, 2, sc)
    torch.manual_seed(0)
    c = engine.generate(prompts, 2, sc)
    assert a.token_ids != b.token_ids and a.token_ids == c.token_ids
