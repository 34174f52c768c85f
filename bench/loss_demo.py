"""A one-minute look at cipo's loss API on a random packed base + correction batch (CPU).

    python -m bench.loss_demo [--groups 16] [--per-group 8]

Builds a step the way the trainer does (base groups, correction groups, rewards, rollout log-probs), computes
GRPO advantages, the joint loss ``L_base + λ·L_corr`` with its gradient, and checks it against two separate
per-stream calls. Until the trainer lands this is the README's main command.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from cipo import PackedBatch, PolicyLossConfig, SequenceSample, cipo_policy_loss, group_advantages, policy_loss


def random_step(groups: int, per_group: int, seed: int) -> PackedBatch:
    rng = random.Random(seed)
    seqs = []
    for stream in (0, 1):
        for g in range(groups):
            prompt = [rng.randrange(1000) for _ in range(rng.randint(8, 64) * (1 + 3 * stream))]
            for _ in range(per_group):
                n = rng.randint(1, 256)
                logp = [-rng.expovariate(2.0) for _ in range(n)]
                seqs.append(SequenceSample(prompt, [rng.randrange(1000) for _ in range(n)],
                                           float(rng.random() < 0.4 + 0.2 * stream), g + stream * groups, stream,
                                           old_logp=logp, rollout_logp=[v + rng.gauss(0, 0.05) for v in logp]))
    return PackedBatch.from_sequences(seqs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--per-group", type=int, default=8)
    parser.add_argument("--lambda-corr", type=float, default=1.0)
    args = parser.parse_args()

    batch = random_step(args.groups, args.per_group, seed=0)
    cfg = PolicyLossConfig(clip_ratio_high=0.28, tis_mode="token", loss_agg_mode="token-mean")
    logp = (batch.old_logp + 0.05 * torch.randn(batch.num_tokens)).requires_grad_()
    start = time.perf_counter()
    loss, metrics = cipo_policy_loss(logp, batch, cfg, lambda_corr=args.lambda_corr)
    loss.backward()
    elapsed = time.perf_counter() - start

    adv = group_advantages(batch.reward, batch.group_id)
    parts = []
    for stream in (0, 1):
        rows = [r for r in range(batch.num_seqs) if int(batch.stream[r]) == stream]
        sub = batch.select(rows)
        sub_logp = torch.cat([logp.detach()[int(batch.cu_seqlens[r]):int(batch.cu_seqlens[r + 1])] for r in rows])
        parts.append(policy_loss(sub_logp, sub.old_logp, adv[rows], sub.loss_mask, cfg,
                                 rollout_logp=sub.rollout_logp, cu_seqlens=sub.cu_seqlens)[0].item())
    check = parts[0] + args.lambda_corr * parts[1]

    print(f"packed step: {batch.num_seqs} sequences, {batch.num_tokens} tokens "
          f"({metrics['tokens/base']:.0f} base + {metrics['tokens/corr']:.0f} correction loss tokens)")
    print(f"joint loss {loss.item():+.6f}  (per-stream check {check:+.6f})  forward+backward {elapsed * 1e3:.1f} ms")
    for key in sorted(metrics):
        print(f"  {key:<16} {metrics[key]:+.6f}")


if __name__ == "__main__":
    main()
