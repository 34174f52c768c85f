"""The tiny model's warm start, measured: held-out accuracy, steps and time to the stopping target, the kinds of
errors left, and one correction pass on the model's own attempts.

    python -m bench.warmstart --seeds 0 1 2 3
    python -m bench.warmstart --seeds 0 1 2 3 --correction-fraction 0.5

Each seed builds a tiny model and tokenizer in a temporary directory, warm-starts it with
:func:`cipo.warmstart.warm_start` until :class:`cipo.warmstart.AccuracyStopper` sees the target, then samples 4
answers per held-out prompt at T = 1 (classified by :func:`classify_error`) and greedily. Results
are printed; the figures of record are in docs/TRAINER.md.
"""

from __future__ import annotations

import time

from cipo.data.dataset import chat_prompt_ids
from cipo.warmstart import AccuracyStopper, sampled_accuracy, warm_start


def classify_error(response: str, row: dict) -> str:
    """Rough error class of a wrong synthetic-task response, for reports:
    ``"format"`` (no boxed integer), ``"dropped_carry"`` (columns match a forgotten carry), ``"column"`` (a written
    column is miscomputed or misread), ``"inconsistent"`` (columns right, boxed answer not), ``"correct"``."""
    import re

    from cipo.data.synthetic import dropped_carry_solutions, last_boxed, score, solution_for

    gt = row["reward_model"]["ground_truth"]
    if score(response, gt) == 1.0:
        return "correct"
    boxed = last_boxed(response)
    if boxed is None or not re.fullmatch(r"\s*[+-]?\d+\s*", boxed):
        return "format"

    def work(text: str) -> str:
        return text.rsplit("\\boxed{", 1)[0].strip()

    if any(work(s) == work(response) for s in dropped_carry_solutions(row)):
        return "dropped_carry"
    if work(response) == work(solution_for(row)):
        return "inconsistent"
    return "column"


def main() -> None:
    """Build, warm-start and evaluate one tiny model per seed (everything in a temp dir)."""
    import argparse
    import collections
    import os
    import tempfile

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from cipo.data.synthetic import Difficulty, make_splits, score
    from cipo.models.tiny import build_tiny_model, build_tiny_tokenizer
    from cipo.rollout import SamplingConfig, make_engine

    ap = argparse.ArgumentParser(prog="python -m bench.warmstart", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--digits", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=600)
    ap.add_argument("--target", type=float, default=0.35)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--correction-fraction", type=float, default=0.0,
                    help="share of rows that also get a correction-style example (cipo.algorithm.template)")
    ap.add_argument("--correction-format", default=None,
                    help="CorrectionTemplate.user_format ({problem}, {attempt}); default: the template's own")
    args = ap.parse_args()
    from cipo.algorithm.template import CorrectionTemplate

    template = CorrectionTemplate(max_attempt_tokens=None)
    if args.correction_format:
        template = CorrectionTemplate(user_format=args.correction_format.replace("\\n", "\n"),
                                      max_attempt_tokens=None)

    def builder(prompt, attempt):
        return template.build(prompt, attempt).messages

    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            tok = build_tiny_tokenizer(d)
            model = build_tiny_model(d, tok, seed=seed)
            train, test = make_splits(5000, 400, seed=seed, difficulty=Difficulty(digits=args.digits))
            engine = make_engine(args.engine, d)
            t_setup = time.perf_counter() - t0
            stopper = AccuracyStopper(model, engine, tok, test[:128], target=args.target, every=args.every,
                                      min_steps=100)
            res = warm_start(model, tok, train, steps=args.max_steps, seed=seed, progress=False, on_step=stopper,
                             correction_builder=builder if args.correction_fraction > 0 else None,
                             correction_fraction=args.correction_fraction)
            engine.update_weights(model.named_parameters())
            t1 = time.perf_counter()
            held = test[128:]
            prompts = [chat_prompt_ids(tok, r["prompt"]) for r in held]
            batch = engine.generate(prompts, 4, SamplingConfig(temperature=1.0, max_tokens=48, seed=seed + 1))
            kinds = collections.Counter(
                classify_error(t, held[batch.prompt_index[k]]) for k, t in enumerate(batch.texts))
            greedy = sampled_accuracy(engine, tok, held, SamplingConfig(temperature=0.0, max_tokens=48))
            t_eval = time.perf_counter() - t1
            acc = kinds["correct"] / len(batch)
            print(f"seed {seed}: setup {t_setup:.1f}s, warm start {res.seconds:.1f}s ({res.steps} steps, "
                  f"{stopper.seconds:.1f}s of it in {len(stopper.history)} stop checks {stopper.history}), "
                  f"held-out acc T=1 {acc:.3f} (n={len(batch)}), greedy {greedy:.3f}, eval {t_eval:.1f}s, "
                  f"outcomes {dict(kinds)}", flush=True)
            wrong = [(held[batch.prompt_index[k]]["prompt"][0]["content"], t) for k, t in enumerate(batch.texts)
                     if kinds and classify_error(t, held[batch.prompt_index[k]]) != "correct"]
            for q, t in wrong[:6]:
                print(f"   {q[8:q.index('?')]:>8} -> {t}")
            # one refinement per first attempt, conditioned on the model's own attempt
            firsts = list(range(0, len(batch), 4))
            cprompts = [chat_prompt_ids(tok, builder(held[batch.prompt_index[k]]["prompt"], batch.texts[k]))
                        for k in firsts]
            ref = engine.generate(cprompts, 1, SamplingConfig(temperature=1.0, max_tokens=48, seed=seed + 2))
            stats = collections.Counter()
            for j, k in enumerate(firsts):
                row = held[batch.prompt_index[k]]
                before = score(batch.texts[k], row["reward_model"]["ground_truth"])
                after = score(ref.texts[j], row["reward_model"]["ground_truth"])
                stats[f"{'right' if before else 'wrong'}->{'right' if after else 'wrong'}"] += 1
            print(f"   correction pass (T=1, own attempts): {dict(stats)}", flush=True)
            engine.close()


if __name__ == "__main__":
    main()
