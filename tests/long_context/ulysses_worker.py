"""Worker for test_ulysses.py, launched by ``torchrun --nproc_per_node 2``: cipo's :class:`UlyssesSP` (DeepSpeed's
UlyssesSPAttentionHF + cipo's position-masked core attention) on a tiny Qwen3 over gloo (CPU). Writes
``{out}/rank{r}.json`` with the differences to one-process sdpa references.

``worker OUT sdpa``: forward and backward. ``worker OUT flex_attention``: forward only (torch has no flex_attention
backward on CPU) — DeepSpeed's flex path, which rebuilds a causal BlockMask, then cipo's mask from position_ids."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch


def main(out_dir: str, attention: str) -> None:
    import deepspeed

    from cipo.trainer.build_locks import prepare_deepspeed

    prepare_deepspeed()  # as the trainer: no shm op to build, no endless wait on a stale build lock
    deepspeed.init_distributed(dist_backend="gloo")
    import torch.distributed as dist

    from cipo.models.tiny import build_tiny_model, build_tiny_tokenizer
    from cipo.trainer.forward import packed_hidden_states
    from cipo.trainer.sequence_parallel import UlyssesSP
    from cipo.trainer.shared_prefix import SharedPrefixLayout
    from tests.long_context.test_shared_prefix import mixed_batch

    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_tiny_model(tokenizer=build_tiny_tokenizer(), seed=0, num_hidden_layers=2, hidden_size=32,
                             intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16).train()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    layout = SharedPrefixLayout.build(mixed_batch(vocab=vocab))
    cases = {  # name: (input_ids, position_ids, reference hidden states from one process)
        "one_sequence": torch.arange(22),
        "two_packed_sequences": torch.cat([torch.arange(11), torch.arange(11)]),
        "odd_packed_sequences": torch.cat([torch.arange(7), torch.arange(1), torch.arange(5)]),  # 13: padded
    }
    streams = {name: (torch.randint(0, vocab, (pos.numel(),), generator=gen), pos) for name, pos in cases.items()}
    streams["shared_prefix_stream"] = (layout.input_ids, layout.position_ids)
    weights = {name: torch.randn(ids.numel(), 32, generator=gen) for name, (ids, _) in streams.items()}

    def reference(m, name):
        m.zero_grad(set_to_none=True)
        ids, pos = streams[name]
        if name == "shared_prefix_stream":  # the layout's explicit mask
            out = m.model(input_ids=ids[None], position_ids=pos[None], attention_mask=layout.attention_mask(m),
                          use_cache=False).last_hidden_state[0]
        else:  # transformers' own block-diagonal mask from position_ids
            out = packed_hidden_states(m, ids, pos)
        (out * weights[name]).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    references = {name: reference(copy.deepcopy(model), name) for name in streams}
    bystander = copy.deepcopy(model)  # a model the SP attention must not touch (the KL reference, the engine)

    backward = attention == "sdpa"
    model.config._attn_implementation = attention
    sp = UlyssesSP.setup(model, world)
    result = {"rank": rank, "world": world, "sp_rank": sp.rank, "attention": attention}
    for name, (ids, pos) in streams.items():
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            hidden = sp.hidden_states(model, ids, pos)  # [L, H] on every rank
        ref_hidden, ref_grads = references[name]
        result[name] = {"tokens": ids.numel(), "hidden_max_abs": float((hidden.detach() - ref_hidden).abs().max())}
        if backward:
            # disjoint loss tokens per rank (as the trainer's loss_rows): the ranks' gradients sum to the whole one
            mine = (torch.arange(ids.numel()) % world == rank).float()[:, None]
            (hidden * weights[name] * mine).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            for g in grads.values():
                dist.all_reduce(g)
            result[name]["grad_max_rel"] = max(float((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm())
                                               for n in ref_grads)
    ids, pos = streams["two_packed_sequences"]
    with torch.no_grad():
        other = packed_hidden_states(bystander, ids, pos)
    result["bystander_hidden_max_abs"] = float((other - references["two_packed_sequences"][0]).abs().max())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "sdpa")
