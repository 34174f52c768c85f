"""VLLMEngine under data parallelism: 2 torchrun ranks, each with its own in-process engine, after the trainer's
``init_process_group`` (gloo).

Each rank samples its own (uneven) shard of the prompts with seed ``s + offset``; together they must give the
completions of one process sampling the whole batch with seed ``s`` (per-request seeds). The trainer's default
process group must survive the engines (vLLM's shutdown would otherwise destroy it). ``sleep_mode=True`` is passed
too: on CPU it is ignored and ``sleep``/``wake_up`` are no-ops. ~35 s on 2 busy cores.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from cipo.rollout import SamplingConfig, VLLMEngine  # noqa: E402
from tests._launch import free_port, run_child  # noqa: E402
from tests._tiny import load_tiny  # noqa: E402

from ._helpers import prompts_for  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SEED, N, SHARDS = 11, 2, (0, 3, 5)  # rank r samples prompts SHARDS[r]:SHARDS[r + 1]
SAMPLING = dict(temperature=1.0, max_tokens=16)

RANK_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist

from cipo.rollout import SamplingConfig, VLLMEngine

def main():
    model_dir, spec_path, out_path = sys.argv[1:4]
    spec = json.load(open(spec_path))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("gloo")  # the trainer comes first
    rank = dist.get_rank()
    engine = VLLMEngine(model_dir, kv_cache_bytes=32 * 2**20, max_num_seqs=16, sleep_mode=True)
    lo, hi = spec["shards"][rank], spec["shards"][rank + 1]
    engine.sleep()
    engine.wake_up()
    batch = engine.generate(spec["prompts"][lo:hi], spec["n"],
                            SamplingConfig(seed=spec["seed"] + lo, **spec["sampling"]))
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {"token_ids": batch.token_ids, "logprobs": batch.logprobs})
    engine.close()
    ok = torch.ones(1)
    dist.all_reduce(ok)  # the trainer's group outlives the engine
    if rank == 0:
        json.dump({"parts": parts, "world": dist.get_world_size(), "sum": ok.item()}, open(out_path, "w"))
    dist.destroy_process_group()

if __name__ == "__main__":
    main()
"""


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs 2 GPUs on CUDA")
def test_two_ranks_match_single_process(tiny_dir, tmp_path):
    _, tok = load_tiny(tiny_dir)
    prompts = prompts_for(tok, ("12+34", "505+7", "9+990", "1+1", "77+8"))
    spec = {"prompts": prompts, "shards": SHARDS, "seed": SEED, "n": N, "sampling": SAMPLING}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    out = tmp_path / "out.json"
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(tmp_path / "rank.py"), str(tiny_dir), str(tmp_path / "spec.json"),
           str(out)]
    run_child(cmd, timeout=300, env=env, cwd=tmp_path, what="torchrun rank.py (2 vLLM engines)")
    res = json.loads(out.read_text())
    assert res["world"] == 2 and res["sum"] == 2.0
    dp_ids = [ids for part in res["parts"] for ids in part["token_ids"]]
    dp_lps = [lps for part in res["parts"] for lps in part["logprobs"]]

    engine = VLLMEngine(tiny_dir, kv_cache_bytes=32 * 2**20, max_num_seqs=16)
    try:
        ref = engine.generate(prompts, N, SamplingConfig(seed=SEED, **SAMPLING))
    finally:
        engine.close()
    assert len(dp_ids) == len(ref) == len(prompts) * N
    assert dp_ids == ref.token_ids
    # Same tokens; logprobs differ only by fp32 rounding of differently sized batches (measured <= 5e-7).
    err = max(abs(a - b) for x, y in zip(dp_lps, ref.logprobs) for a, b in zip(x, y))
    assert err < 1e-5
