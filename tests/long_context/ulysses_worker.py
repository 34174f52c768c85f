"""Worker for test_ulysses.py, launched by ``torchrun --nproc_per_node 2``: DeepSpeed's UlyssesSPAttentionHF on a
tiny Qwen3 over gloo (CPU). Writes ``{out}/rank{r}.json`` with the differences to a one-process reference."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch


def main(out_dir: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    import torch.distributed as dist

    from cipo.models.tiny import build_tiny_model, build_tiny_tokenizer
    from cipo.trainer.long_context import enable_ulysses, shard_sequence

    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_tiny_model(tokenizer=build_tiny_tokenizer(), seed=0, num_hidden_layers=2, hidden_size=32,
                             intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8).train()
    gen = torch.Generator().manual_seed(0)
    length = 22  # divisible by the SP size
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=gen)
    weights = torch.randn(1, length, 32, generator=gen)

    def run(m, input_ids, position_ids, w):
        m.zero_grad(set_to_none=True)
        hidden = m.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        (hidden * w).sum().backward()
        return hidden.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    # one sequence; then two packed sequences (position_ids restart at 11)
    packed_pos = torch.cat([torch.arange(11), torch.arange(11)])[None]
    cases = {"one_sequence": torch.arange(length)[None], "two_packed_sequences": packed_pos}
    reference = {name: run(copy.deepcopy(model), ids, pos, weights) for name, pos in cases.items()}

    enable_ulysses(model, sp_size=world)  # replaces the sdpa attention function of this process
    result = {"rank": rank, "world": world}
    for name, pos in cases.items():
        hidden, grads = run(model, shard_sequence(ids, rank, world), shard_sequence(pos, rank, world),
                            shard_sequence(weights, rank, world, dim=1))
        for g in grads.values():
            dist.all_reduce(g)  # each rank holds the gradient of its shard's loss: the sum is the whole one
        gathered = [torch.empty_like(hidden) for _ in range(world)]
        dist.all_gather(gathered, hidden)
        ref_hidden, ref_grads = reference[name]
        result[name] = {
            "hidden_max_abs": float((torch.cat(gathered, dim=1) - ref_hidden).abs().max()),
            "grad_max_rel": max(float((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()) for n in ref_grads),
        }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
