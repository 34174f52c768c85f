"""``actor.ulysses_sequence_parallel_size: 2`` in the trainer: ranks over gloo (torchrun) that split every
micro-batch's tokens in pairs give the steps of one DeepSpeed process that does not — losses, entropies and
gradient norms to 1e-5 relative over 2 steps of 2 epochs (so the updated weights agree too; the attention's sums
run per head group and the loss over the same rows, in another order). Cases: 2 ranks with the plain packed layout
under ZeRO-3, and with the shared prefix under ZeRO-2; 4 ranks (2 data-parallel × 2 sequence-parallel) with the
shared prefix under ZeRO-3; 2 ranks with one sequence per micro-batch. Each rank's decoder sees half of the tokens
(``batch/tokens_forward`` sums the shards). About 1.5 min on the 2-core machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests._launch import REPO, child_env, free_port, run_child
from tests.long_context.test_deepspeed_switches import SETTINGS

pytest.importorskip("deepspeed")

RTOL = 1e-5


def run(run_dir: Path, ranks: int, *extra: str, resume: bool = False) -> list[dict]:
    sets = [*SETTINGS, f"trainer.run_dir={run_dir}", *extra]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                f"--master_port={free_port()}", "-m", "cipo.cli"] if ranks > 1 else [sys.executable, "-m", "cipo.cli"]
    cmd = [*launcher, "train", str(REPO / "configs" / "tiny.yaml"), *[a for s in sets for a in ("--set", s)],
           *(["--resume"] if resume else [])]
    run_child(cmd, timeout=900, env=child_env(), what=f"cipo train on {ranks} rank(s)")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("ranks", "shared_prefix", "stage", "budget"),
                         [(2, False, 3, 384), (2, True, 2, 384), (4, True, 3, 384), (2, False, 3, 1)],
                         ids=["sp2-packed-zero3", "sp2-shared_prefix-zero2", "dp2xsp2-shared_prefix-zero3",
                              "sp2-one-sequence-per-micro-batch-zero3"])
def test_sequence_parallel_ranks_equal_one_process(tmp_path: Path, ranks: int, shared_prefix: bool, stage: int,
                                                   budget: int):
    """The gradient norm checks the gradient's scale, which Adam's update would hide: DeepSpeed divides the ranks'
    sum by a different number on ZeRO-2 and ZeRO-3 under SP (backend.gradient_divisor). With one sequence per
    micro-batch one rank of the group has no loss rows in every micro-batch (its zero loss must still reach the
    weights ZeRO-3 gathered)."""
    # two epochs: the old log-probs come from a sequence-parallel no-grad forward, so ratios move off 1
    switches = (f"actor.shared_prefix={str(shared_prefix).lower()}", f"deepspeed.zero_stage={stage}",
                "actor.ppo_epochs=2", f"actor.micro_batch_tokens={budget}")
    one = run(tmp_path / "one", 1, *switches)
    sp = run(tmp_path / "sp", ranks, *switches, "actor.ulysses_sequence_parallel_size=2")
    assert len(one) == len(sp) == 2
    for a, b in zip(one, sp):
        assert a["batch/tokens"] == b["batch/tokens"]
        assert a["actor/grad_norm"] > 0 and a["actor/entropy"] > 0 and a["actor/tokens/corr"] > 0
        assert a["actor/last/approx_kl"] != 0  # the second epoch's ratios are not 1
        for key in ("actor/loss", "actor/pg_loss", "actor/entropy", "actor/grad_norm", "actor/loss/base",
                    "actor/loss/corr", "actor/tokens/base", "actor/tokens/corr"):
            assert b[key] == pytest.approx(a[key], rel=RTOL, abs=1e-9), key
        # approx_kl (~6e-5) is a mean of squared log-ratio differences (~1e-2) that cancel: 1e-7 absolute on each
        # log-prob is ~1e-4 relative on it
        assert b["actor/approx_kl"] == pytest.approx(a["actor/approx_kl"], rel=1e-3)
        # the decoder work is split: the shards add up to the streams, + at most 1 padding token per forward
        assert a["batch/tokens_forward"] <= b["batch/tokens_forward"] <= 1.01 * a["batch/tokens_forward"]
        assert b["batch/tokens_forward_unshared"] == a["batch/tokens_forward_unshared"]


def test_sequence_parallel_run_resumes_and_exports(tmp_path: Path):
    """Checkpoints and the HF export under SP: 2 steps + ``--resume`` to 3 give the uninterrupted run's third step
    bit for bit, and the consolidated model is written."""
    sets = ("actor.ulysses_sequence_parallel_size=2", "trainer.save_every=1", "trainer.save_hf_model=true")
    straight = run(tmp_path / "straight", 2, *sets, "trainer.total_steps=3")
    run(tmp_path / "resumed", 2, *sets, "trainer.total_steps=2")
    resumed = run(tmp_path / "resumed", 2, *sets, "trainer.total_steps=3", resume=True)
    assert len(straight) == len(resumed) == 3
    for key in ("actor/loss", "actor/grad_norm", "actor/entropy", "base/reward"):
        assert resumed[2][key] == straight[2][key], key
    assert (tmp_path / "resumed" / "hf_model" / "config.json").exists()
