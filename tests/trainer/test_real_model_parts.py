"""What a real instruct model needs from the trainer, on a small Llama with tied embeddings built in code (the
architecture of SmolLM2): the fused loss on a tied LM head, LoRA with a frozen head (no weight-gradient GEMM) and
merged weights for the engine and the export, and fp32 master weights for bf16 training."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cipo import CORRECTION_STREAM, PackedBatch, PolicyLossConfig, SequenceSample
from cipo.trainer.backend import PolicyModule, TorchBackend
from cipo.trainer.config import ActorConfig, LoraSection, TrainConfig
from cipo.trainer.forward import lm_head_weight

peft = pytest.importorskip("peft")

VOCAB = 97  # odd: not a multiple of any block size


def tied_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model


def two_stream_batch(seed: int = 3) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    # token ids below VOCAB // 2 only: the upper half of the vocabulary is never an input, so its embedding rows
    # get gradient from the LM head alone
    seqs = [SequenceSample(torch.randint(0, VOCAB // 2, (p,), generator=g).tolist(),
                           torch.randint(0, VOCAB // 2, (r,), generator=g).tolist(), float(k % 2), group,
                           stream=CORRECTION_STREAM if group else 0)
            for k, (p, r, group) in enumerate([(3, 5, 0), (2, 4, 0), (1, 1, 0), (4, 3, 1), (4, 6, 1)])]
    batch = PackedBatch.from_sequences(seqs)
    batch.old_logp = (torch.randn(batch.num_tokens, generator=g) * 0.1 - 4.0) * batch.loss_mask.float()
    return batch


def loss_and_grads(model, batch: PackedBatch, fused: bool):
    cfg = PolicyLossConfig(temperature=0.8, clip_ratio_high=0.28)
    model.zero_grad(set_to_none=True)
    loss, _ = PolicyModule(model)(batch, cfg, fused=fused, lambda_corr=0.5)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_tied_head_fused_loss_equals_the_unfused_path_shared_embedding_included():
    model = tied_llama()
    batch = two_stream_batch()
    fused_loss, fused = loss_and_grads(model, batch, fused=True)
    plain_loss, plain = loss_and_grads(model, batch, fused=False)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert fused.keys() == plain.keys() and "model.embed_tokens.weight" in fused
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    # the shared weight collects the head's gradient too: rows of tokens that are never an input still move
    never_input = fused["model.embed_tokens.weight"][VOCAB // 2:]
    assert never_input.abs().sum() > 0


def lora_model(seed: int = 0):
    from cipo.trainer.lora import apply_lora

    model = apply_lora(tied_llama(seed), LoraSection(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj",
                                                                                          "down_proj"]))
    with torch.no_grad():  # B starts at zero: make the adapters do something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model


def test_lora_freezes_the_head_and_the_fused_loss_skips_the_weight_gradient(monkeypatch):
    from cipo.kernels import fused_linear_policy_loss as fused_module

    calls = []
    original = fused_module.token_chunk_pass

    def spy(*args, **kwargs):
        calls.append(kwargs["grad_weight"])
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_module, "token_chunk_pass", spy)
    model = lora_model()
    assert not lm_head_weight(model).requires_grad
    batch = two_stream_batch()
    fused_loss, fused = loss_and_grads(model, batch, fused=True)
    assert calls and not any(calls), "the fused loss computed dW for a frozen LM head"
    assert fused and all("lora_" in name for name in fused), sorted(fused)
    plain_loss, plain = loss_and_grads(model, batch, fused=False)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert fused.keys() == plain.keys()
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-7, msg=name)
    # every other gradient is the one a trainable head would give: only dW is skipped
    lm_head_weight(model).requires_grad_(True)
    calls.clear()
    _, with_head = loss_and_grads(model, batch, fused=True)
    assert calls and all(calls)
    for name in fused:
        assert torch.equal(fused[name], with_head[name]), name


def test_lora_merged_weights_reproduce_the_adapted_model():
    from transformers import LlamaForCausalLM

    from cipo.trainer.lora import lora_scaling, merge_lora_state_dict, merged_named_weights

    model = lora_model().eval()
    merged = dict(merged_named_weights(model))
    plain = tied_llama(seed=1).eval()
    assert set(merged) == {name for name, _ in plain.named_parameters()}
    plain.load_state_dict(merged, strict=False)
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    # a LoRA checkpoint's state dict merges to the same weights (cipo export / cipo eval of a checkpoint)
    from_checkpoint = merge_lora_state_dict(model.state_dict(), lora_scaling(LoraSection(rank=4, alpha=8.0)))
    assert set(from_checkpoint) >= set(merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(from_checkpoint[name], tensor, rtol=0, atol=1e-7, msg=name)
    assert isinstance(plain, LlamaForCausalLM)


def test_lora_rejects_unknown_target_modules():
    from cipo.trainer.lora import apply_lora

    with pytest.raises(ValueError, match=r"target_modules \['c_attn'\]"):
        apply_lora(tied_llama(), LoraSection(rank=2, target_modules=["q_proj", "c_attn"]))


def bf16_backend(lr: float) -> TorchBackend:
    config = TrainConfig(actor=ActorConfig(lr=lr, grad_clip=0.0))
    return TorchBackend(tied_llama(dtype=torch.bfloat16), config, SimpleNamespace(distributed=False))


def test_bf16_weights_train_through_fp32_master_weights(tmp_path):
    backend = bf16_backend(lr=1e-4)
    assert backend.master is not None
    assert all(p.dtype == torch.float32 for p in backend.master.params)
    before = [p.detach().float().clone() for p in backend.master.params]
    batch = two_stream_batch()
    cfg = PolicyLossConfig(temperature=1.0)
    for _ in range(3):
        backend.zero_grad()
        loss, _ = backend.forward(batch, cfg)
        backend.backward(loss, last=True)
        backend.step()
    moved = [(m - b).abs().max().item() for m, b in zip(backend.master.params, before)]
    assert max(moved) > 0
    for p, m in zip(backend.master.model_params, backend.master.params):
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), m.detach().to(torch.bfloat16))
    # a checkpoint keeps the masters: a resumed run continues from fp32, not from the rounded bf16 weights
    saved = backend.save(tmp_path / "step", {"step": 3})
    other = bf16_backend(lr=1e-4)
    other.load(saved)
    for a, b in zip(other.master.params, backend.master.params):
        assert torch.equal(a, b)


def test_bf16_updates_below_half_an_ulp_are_kept_by_the_masters():
    """AdamW's first step moves each weight by ~lr; at lr 1e-6 that is far below a bf16 ulp of weights of size
    ~0.02 (1.2e-4): a bf16 optimizer would lose it, the fp32 masters keep it."""
    backend = bf16_backend(lr=1e-6)
    before = [p.detach().clone() for p in backend.master.params]
    backend.zero_grad()
    loss, _ = backend.forward(two_stream_batch(), PolicyLossConfig())
    backend.backward(loss, last=True)
    backend.step()
    assert any(not torch.equal(a, b) for a, b in zip(backend.master.params, before))
