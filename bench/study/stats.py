"""The study's statistics: the metrics read from one evaluation, mean ± 95 % t-interval over seeds, and paired
differences between arms over the seeds where both finished."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

METRICS = [
    ("accuracy", "held-out accuracy"),
    ("pass@1", "pass@1"),
    ("pass@4", "pass@4"),
    ("pass@16", "pass@16"),
    ("correction_success", "correction success"),
    ("regression_rate", "regression rate"),
    ("accuracy_after_correction", "accuracy after one correction pass"),
    ("resample_success", "resampling baseline of correction success"),
    ("resample_regression", "resampling baseline of regression"),
]


# Two-sided 95 % quantiles of Student's t, df = 1..30 (beyond: the normal quantile, 1.96).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"t_quantile: df must be >= 1, got {df}")
    return T975[df - 1] if df <= len(T975) else 1.96


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the 95 % CI half-width ``t(df) · sd / √s`` over seeds (NaNs dropped;
    one value: no CI)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"mean": math.nan, "sd": math.nan, "ci95": math.nan, "n": 0}
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return {"mean": mean, "sd": math.nan, "ci95": math.nan, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return {"mean": mean, "sd": sd, "ci95": t_quantile(len(vals) - 1) * sd / math.sqrt(len(vals)), "n": len(vals)}


def eval_metrics(ev: dict[str, Any]) -> dict[str, float]:
    """The table's metrics from one :func:`cipo.evaluation.evaluate_run` result."""
    out = {"accuracy": ev["accuracy"]}
    for k, value in ev["pass_at_k"].items():
        out[f"pass@{k}"] = value
    for key in ("correction_success", "regression_rate", "accuracy_after_correction"):
        out[key] = ev.get(key, math.nan)
    if "correct_counts" in ev:
        from cipo.evaluation import resampling_baselines

        out.update(resampling_baselines(ev["correct_counts"], ev["n"]))
    return out



def prompt_paired_difference(counts: Sequence[int], reference: Sequence[int], n: int) -> dict[str, Any]:
    """Accuracy difference between two evaluations of the same held-out prompts (``correct_counts`` of ``n`` samples
    each, in the same prompt order): mean ± 95 % t-interval over the prompts — the evaluation's own noise, paired."""
    if len(counts) != len(reference) or not counts:
        raise ValueError(f"paired by prompt: {len(counts)} vs {len(reference)} prompts")
    return mean_ci([(c - r) / n for c, r in zip(counts, reference)])


def common_seeds(by_arm: dict[str, dict[int, dict[str, float]]], arm: str, reference: str) -> list[int]:
    """The seeds where both ``arm`` and ``reference`` finished: the only ones a paired difference may use."""
    return sorted(set(by_arm.get(reference, {})) & set(by_arm.get(arm, {})))


def paired_difference(by_arm: dict[str, dict[int, dict[str, float]]], arm: str, reference: str,
                      names: Sequence[str]) -> Optional[dict[str, Any]]:
    """Per metric, mean ± CI over seeds of ``arm − reference``, over :func:`common_seeds` (a partial study pairs
    only what it has); None when the two share no seed."""
    common = common_seeds(by_arm, arm, reference)
    if not common:
        return None
    mine, theirs = by_arm[arm], by_arm[reference]
    return {m: mean_ci([mine[s].get(m, math.nan) - theirs[s].get(m, math.nan) for s in common]) for m in names}


def aggregate(records: list[dict[str, Any]], arms: Sequence[str],
              contrasts: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """Per arm and metric: mean ± CI over seeds; per arm other than GRPO: the paired difference to GRPO; with
    ``contrasts`` (``(arm, reference)`` pairs), also ``arm − reference`` under ``"contrasts"`` keyed
    ``"arm−reference"``. Every paired difference uses only the seeds where both arms finished."""
    by_arm: dict[str, dict[int, dict[str, float]]] = {}
    for rec in records:
        by_arm.setdefault(rec["spec"]["arm"], {})[rec["spec"]["seed"]] = eval_metrics(rec["eval"])
    out: dict[str, Any] = {"arms": {}, "paired_vs_grpo": {}}
    names = list(dict.fromkeys([m for m, _ in METRICS]
                               + [m for seeds in by_arm.values() for v in seeds.values() for m in v]))
    for arm, seeds in by_arm.items():
        out["arms"][arm] = {m: mean_ci([v.get(m, math.nan) for v in seeds.values()]) for m in names}
        out["arms"][arm]["seeds"] = sorted(seeds)
    for arm in arms:
        if arm == "grpo" or arm not in by_arm:
            continue
        diff = paired_difference(by_arm, arm, "grpo", names)
        if diff is not None:
            out["paired_vs_grpo"][arm] = diff
    if contrasts:
        out["contrasts"] = {}
        for arm, reference in contrasts:
            diff = paired_difference(by_arm, arm, reference, names)
            if diff is not None:
                out["contrasts"][f"{arm}−{reference}"] = {**diff, "seeds": common_seeds(by_arm, arm, reference)}
    return out
