"""Probes of finished runs (``python -m bench.study --probe RUN_DIR...``): why correction success is what it is on
the synthetic addition task — the error classes of a policy's failures, and how its refinements relate to the
attempt they were given (docs/STUDY.md §3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def classify_failure(text: str, row: dict) -> str:
    """Error class of one synthetic-addition response, column by column against the true operands: ``correct``,
    ``format``, ``wrong column count``, ``misread operand digit``, ``dropped/extra carry``, ``miscomputed column
    sum`` or ``boxed answer disagrees with columns`` (the first fault from the units column on)."""
    import re

    from cipo.data import synthetic

    truth = row["reward_model"]["ground_truth"]
    if synthetic.score(text, truth) >= 1.0:
        return "correct"
    boxed = synthetic.last_boxed(text)
    if boxed is None or not re.fullmatch(r"\s*\d+\s*", boxed):
        return "format"
    op, operands = synthetic._expr_operands(row)
    if op != "+":
        raise ValueError("classify_failure handles addition only")
    cols = [synthetic._digits_rev(x) for x in operands]
    steps = text.rsplit("\\boxed{", 1)[0].split()
    if len(steps) != max(len(c) for c in cols):
        return "wrong column count"
    carry = 0
    for i, step in enumerate(steps):
        match = re.fullmatch(r"(\d+(?:\+\d+)*)=(\d+)", step)
        if not match:
            return "format"
        terms = [int(x) for x in match.group(1).split("+")]
        digits = [c[i] for c in cols if i < len(c)]
        if sorted(terms[:len(digits)]) != sorted(digits):
            return "misread operand digit"
        if terms[len(digits):] != ([carry] if carry else []):
            return "dropped/extra carry"
        if sum(terms) != int(match.group(2)):
            return "miscomputed column sum"
        carry = int(match.group(2)) // 10
    return "boxed answer disagrees with columns"


def probe_run(run_dir: Path, prompts: int = 96, n: int = 8, attempts: int = 2, refinements: int = 4,
              seed: int = 0) -> dict[str, Any]:
    """Diagnostics of a run's final policy on its held-out split (HF engine): the error classes of its failures
    (:func:`classify_failure`), and how refinements relate to their attempt — identical, same boxed answer, or
    another answer, verified or not. Explains *why* correction success is what it is (docs/STUDY.md §3)."""
    import collections

    from cipo import evaluation
    from cipo.algorithm import correction_prompt_ids
    from cipo.data import synthetic
    from cipo.rollout import SamplingConfig, make_engine
    from cipo.rollout.session import PromptCodec, sampling_from_config

    config = evaluation.load_run_config(run_dir)
    policy = evaluation.resolve_policy(run_dir, None, config)
    rows, _ = evaluation.held_out_rows(config, None, prompts)
    engine = make_engine("hf", policy.model_dir)
    codec = PromptCodec.from_config(engine.tokenizer, config)  # the run's prompt length and truncation side
    prompt_ids = codec.prompt_ids

    sampling = sampling_from_config(config, seed, return_logprobs=False)  # the run's T, top-p, top-k, length
    out = engine.generate([prompt_ids(r["prompt"]) for r in rows], n, sampling)
    classes = collections.Counter(classify_failure(t, rows[k // n]) for k, t in enumerate(out.texts))
    picked = [(k // n, out.texts[k]) for k in range(len(out.texts)) if k % n < attempts]
    corr_ids = correction_prompt_ids(config.cipo_config().template, rows, picked, prompt_ids,
                                     encode=codec.encode, decode=codec.decode)
    refined = engine.generate(corr_ids, refinements, SamplingConfig(**{**sampling.to_dict(), "seed": seed + 99}))
    relation = collections.Counter()
    for a, (i, text) in enumerate(picked):
        truth = rows[i]["reward_model"]["ground_truth"]
        before = "right" if synthetic.score(text, truth) >= 1.0 else "wrong"
        for ref in refined.texts[a * refinements:(a + 1) * refinements]:
            kind = ("identical" if ref.strip() == text.strip() else
                    "same answer" if synthetic.last_boxed(ref) == synthetic.last_boxed(text) else "other answer")
            relation[f"{before} attempt -> {kind}, {'verified' if synthetic.score(ref, truth) >= 1 else 'fails'}"] += 1
    engine.close()
    wrong = sum(v for k, v in classes.items() if k != "correct")
    return {"run_dir": str(run_dir), "samples": len(out.texts), "failures": wrong,
            "failure_classes": {k: v / wrong for k, v in classes.most_common() if k != "correct"} if wrong else {},
            "refinements": dict(sorted(relation.items()))}

