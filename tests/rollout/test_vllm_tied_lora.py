"""Weight sync into vLLM for a Llama with tied input/output embeddings (SmolLM2's architecture), full and LoRA:
after the trainer pushes its weights, the engine samples from exactly the trainer's model (logprobs against an fp32
HF forward, 2e-5 as in test_vllm_engine.py)."""

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("peft")

from cipo.rollout import SamplingConfig, make_engine  # noqa: E402
from cipo.trainer.config import LoraSection  # noqa: E402

from .._tied_llama import save_tied_llama  # noqa: E402
from ._helpers import max_logprob_error, prompts_for  # noqa: E402

TOL = 2e-5


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    out = tmp_path_factory.mktemp("tied_llama")
    model, tok = save_tied_llama(out)
    return model, tok, out


@pytest.fixture(scope="module")
def engine(tied):
    eng = make_engine("vllm", tied[2], kv_cache_bytes=32 * 2**20, max_num_seqs=64)
    yield eng
    eng.close()


def sampled_tokens(batch) -> int:
    return sum(len(ids) for ids in batch.token_ids)


def test_tied_embedding_update_reaches_the_head(engine, tied):
    import copy

    model, tok, _ = tied
    prompts = prompts_for(tok)
    sc = SamplingConfig(temperature=1.0, max_tokens=12, seed=3)
    assert max_logprob_error(model, engine.generate(prompts, 2, sc)) < TOL
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.embed_tokens.weight.add_(torch.randn_like(changed.model.embed_tokens.weight) * 0.1)
    names = [name for name, _ in changed.named_parameters()]
    assert "lm_head.weight" not in names  # tied: the trainer pushes the shared tensor once, as the embedding
    try:
        engine.update_weights(changed.named_parameters())
        after = engine.generate(prompts, 2, sc)
        assert sampled_tokens(after) > 6
        assert max_logprob_error(changed, after) < TOL
        assert max_logprob_error(model, after) > 1e-2
    finally:
        engine.update_weights(model.named_parameters())  # the engine is shared by the module


def test_lora_merged_weights_sync(engine, tied):
    import copy

    from cipo.trainer.lora import apply_lora, merged_named_weights

    model, tok, _ = tied
    peft_model = apply_lora(copy.deepcopy(model), LoraSection(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    peft_model.eval()
    engine.update_weights(merged_named_weights(peft_model))
    sc = SamplingConfig(temperature=1.0, max_tokens=12, seed=4)
    batch = engine.generate(prompts_for(tok), 2, sc)
    assert sampled_tokens(batch) > 6
    assert max_logprob_error(peft_model, batch) < TOL
    assert max_logprob_error(model, batch) > 1e-2  # the adapters changed the sampled distribution
