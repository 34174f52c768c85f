"""An independent, deliberately plain implementation of docs/DESIGN.md §4 with Python floats and loops.

It shares no code with cipo: the tests check the library against it, so a formula wrong in both places would
need the same mistake written twice, in two styles.
"""

from __future__ import annotations

import math
from typing import Optional


def advantages_loop(rewards: list[float], groups: list[int], estimator: str, eps: float = 1e-6) -> list[float]:
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out = [0.0] * len(rewards)
    for idx in members.values():
        vals = [rewards[i] for i in idx]
        n = len(vals)
        if n == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(vals) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        for i in idx:
            if n > 1 and max(vals) == min(vals):
                out[i] = 0.0
            elif estimator == "grpo":
                out[i] = (rewards[i] - mean) / (std + eps)
            elif estimator == "drgrpo":
                out[i] = rewards[i] - mean
            elif estimator == "rloo":
                out[i] = (rewards[i] - mean) * n / (n - 1) if n > 1 else rewards[i]
    return out


def kl_loop(logp: float, ref: float, kind: str) -> float:
    if kind in ("k1", "kl"):
        return logp - ref
    if kind in ("k2", "mse"):
        return 0.5 * (logp - ref) ** 2
    if kind == "abs":
        return abs(logp - ref)
    x = min(max(ref - logp, -20.0), 20.0)
    return min(max(math.exp(x) - x - 1.0, -10.0), 10.0)


def policy_loss_loop(
    logp: list[list[float]],
    old: list[list[float]],
    adv: list[list[float]],
    mask: list[list[int]],
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: Optional[float] = 3.0,
    agg: str = "token-mean",
    scale_factor: Optional[float] = None,
    kl_coef: float = 0.0,
    kl_type: str = "low_var_kl",
    ref: Optional[list[list[float]]] = None,
    entropy_coef: float = 0.0,
    entropy: Optional[list[list[float]]] = None,
    tis_mode: Optional[str] = None,
    tis_cap: float = 2.0,
    rollout: Optional[list[list[float]]] = None,
    is_weights: Optional[list[list[float]]] = None,
) -> float:
    """Loss of ragged sequences (lists of per-token lists)."""

    def pg_token(s: int, t: int) -> float:
        ratio = math.exp(min(max(logp[s][t] - old[s][t], -20.0), 20.0))
        a = adv[s][t]
        l1 = -a * ratio
        l2 = -a * min(max(ratio, 1 - clip_low), 1 + clip_high)
        lc = max(l1, l2)
        if clip_c is not None and a < 0:
            lc = min(lc, -a * clip_c)
        if tis_mode == "token":
            lc *= min(math.exp(old[s][t] - rollout[s][t]), tis_cap)
        elif tis_mode == "sequence":
            total = sum(old[s][u] - rollout[s][u] for u in range(len(mask[s])) if mask[s][u])
            lc *= min(math.exp(total), tis_cap)
        if is_weights is not None:
            lc *= is_weights[s][t]
        return lc

    def aggregate(fn) -> float:
        seq_sums, seq_counts = [], []
        for s in range(len(mask)):
            total, count = 0.0, 0
            for t in range(len(mask[s])):
                if mask[s][t]:
                    total += fn(s, t)
                    count += 1
            seq_sums.append(total)
            seq_counts.append(count)
        if agg == "token-mean":
            n = sum(seq_counts)
            return sum(seq_sums) / n if n else 0.0
        if agg == "token-sum":
            return sum(seq_sums)
        present = [s for s in range(len(mask)) if seq_counts[s] > 0]
        if not present:
            return 0.0
        if agg == "seq-mean-token-sum-norm":  # verl 0.9.1: the seq-mean of token sums, then / the constant
            factor = scale_factor if scale_factor is not None else max(len(m) for m in mask)
            return sum(seq_sums[s] for s in present) / len(present) / factor
        if agg == "seq-mean-token-sum":
            return sum(seq_sums[s] for s in present) / len(present)
        if agg == "seq-mean-token-mean":
            return sum(seq_sums[s] / seq_counts[s] for s in present) / len(present)
        raise ValueError(agg)

    loss = aggregate(pg_token)
    if kl_coef:
        loss += kl_coef * aggregate(lambda s, t: kl_loop(logp[s][t], ref[s][t], kl_type))
    if entropy_coef:
        loss -= entropy_coef * aggregate(lambda s, t: entropy[s][t])
    return loss
