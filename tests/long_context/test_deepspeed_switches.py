"""The switches under DeepSpeed ZeRO-3 on 2 ranks (gloo, torchrun): shared prefix + TiledMLP give the steps of the
run without them — losses, entropies, gradient norms to 1e-6 relative over 2 steps (so the first update's weights
agree too) — with fewer tokens through the decoder. About 1.5 min on the 2-core machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests._launch import child_env, free_port, run_child

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]
SETTINGS = [
    "warmstart.max_steps=0", "trainer.total_steps=2", "trainer.num_threads=1", "trainer.save_every=0",
    "trainer.progress=false", "trainer.eval_prompts=2", "trainer.save_hf_model=false",
    "data.synthetic_train_size=64", "data.synthetic_val_size=8",
    "algorithm.train_batch_size=3", "rollout.n=4", "algorithm.correction_batch_size=3",
    "algorithm.correction_rollouts=2", "algorithm.template={max_attempt_tokens: 24}",
    "rollout.max_response_length=12", "rollout.engine=hf", "actor.micro_batch_tokens=384", "actor.lr=1e-3",
    "actor.strategy=deepspeed", "deepspeed.zero_stage=3", "actor.loss={entropy_coef: 0.05}",
    "model.tiny_overrides={hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 2,"
    " num_key_value_heads: 1, head_dim: 32}",
]


def run(run_dir: Path, *extra: str) -> list[dict]:
    sets = [*SETTINGS, f"trainer.run_dir={run_dir}", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "cipo.cli", "train", str(REPO / "configs" / "tiny.yaml"), *[a for s in sets for a in ("--set", s)]]
    run_child(cmd, timeout=900, env=child_env(), what=f"torchrun cipo train ({' '.join(extra) or 'plain'})")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_zero3_two_ranks_with_shared_prefix_and_tiled_mlp(tmp_path: Path):
    plain = run(tmp_path / "plain")
    switched = run(tmp_path / "switched", "actor.shared_prefix=true", "actor.tiled_mlp=true")
    assert len(plain) == len(switched) == 2
    for a, b in zip(plain, switched):
        assert a["batch/tokens"] == b["batch/tokens"]
        assert a["actor/grad_norm"] > 0
        for key in ("actor/loss", "actor/entropy", "actor/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
        # plain: the padding micro-batch forwards a sequence again; shared: prompts once per micro-batch
        assert a["batch/tokens_forward"] == a["batch/tokens_forward_unshared"] >= a["batch/tokens"]
        assert b["batch/tokens_forward"] < b["batch/tokens_forward_unshared"]
