"""The trainer on an HF directory of SmolLM2's architecture (a Llama with tied embeddings, built small in code): full
bf16 training with fp32 master weights and LoRA (merged into vLLM and the export), with shared-prefix packing; the
exported ``hf_model/`` loads in transformers and reproduces the trained policy's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cipo.trainer.config import load_config
from cipo.trainer.trainer import CIPOTrainer

from .._tied_llama import save_tied_llama
from .test_train_e2e import FAST, TINY

pytest.importorskip("peft")

# FAST minus the tiny model's overrides (the model here comes from a directory)
FAST_DIR = [o for o in FAST if not o.startswith("model.tiny_overrides")]


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tied_llama")
    save_tied_llama(out, max_positions=512)
    return out


def initial(model_dir: Path) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    return [p.detach() for p in model.parameters()]


def train(run_dir: Path, model_dir: Path, *extra: str) -> tuple[CIPOTrainer, dict]:
    config = load_config(TINY, [*FAST_DIR, f"trainer.run_dir={run_dir}", f"model.path={model_dir}",
                                "model.dtype=bfloat16", "actor.shared_prefix=true", *extra])
    trainer = CIPOTrainer(config)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    return trainer, summary


def exported_logits_match(trainer: CIPOTrainer, run_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from cipo.trainer.lora import base_model

    exported = AutoModelForCausalLM.from_pretrained(str(run_dir / "hf_model"), local_files_only=True,
                                                    dtype=torch.bfloat16).eval()
    assert exported.config.tie_word_embeddings
    assert not any("lora" in name for name, _ in exported.named_parameters())
    ids = torch.randint(0, exported.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(0))
    policy = trainer.model.eval()
    with torch.no_grad():
        want = policy(input_ids=ids, use_cache=False).logits.float()
        got = exported(input_ids=ids, use_cache=False).logits.float()
    # LoRA: the export holds W + BA rounded to bf16 once, the live model adds the bf16 product in the forward
    tol = 5e-2 if base_model(policy) is not policy else 0.0
    torch.testing.assert_close(got, want, rtol=0, atol=tol + 1e-6)


def test_bf16_full_training_with_master_weights(tmp_path: Path, tied_llama_dir: Path):
    # the HF engine: vLLM's weight sync of a tied model is tests/rollout/test_vllm_tied_lora.py and the smoke test
    trainer, _ = train(tmp_path / "run", tied_llama_dir, "rollout.engine=hf", "actor.lr=1e-3",
                       "actor.loss.entropy_coef=0.01")
    assert any(not torch.equal(m.detach(), p0) for m, p0 in zip(trainer.backend.master.params, initial(tied_llama_dir)))
    assert trainer.backend.master is not None
    for p, m in zip(trainer.backend.master.model_params, trainer.backend.master.params):
        assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
        assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))
    exported_logits_match(trainer, tmp_path / "run")


def test_lora_training_exports_merged_weights(tmp_path: Path, tied_llama_dir: Path):
    trainer, _ = train(tmp_path / "run", tied_llama_dir, "rollout.engine=hf", "actor.lora.rank=4",
                       "actor.lora.alpha=8", "actor.lr=1e-2",
                       "actor.loss.entropy_coef=0.01")  # a gradient even when a group's rewards are all equal
    names = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in name for name in names)
    moved = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert any(p.detach().abs().sum() > 0 for p in moved)  # B starts at 0: the adapters trained
    exported_logits_match(trainer, tmp_path / "run")
