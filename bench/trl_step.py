"""One TRL GRPO training step on CPU at a long completion length: TRL 1.16's default against cipo inside it.

    OMP_NUM_THREADS=1 $(bash scripts/integration_env.sh trl)/bin/python -m bench.trl_step       # ~1-2 min
    ... -m bench.trl_step --quick                                                                 # smoke, seconds

What is measured: the part of a GRPO optimizer step that the LM head and the loss change — TRL's
``GRPOTrainer.compute_loss`` (policy forward through the fused LM head, per-token log-probs and entropies, the
policy loss) and its ``backward``, on a batch of completions of ``--completion-len`` tokens. Generation (HF
``generate``), rewards and the optimizer update are the same code for every method and are left out. Methods, each
on a fresh trainer and model built from the same checkpoint, in one process:

* ``trl`` — ``trl.GRPOTrainer`` as shipped (its chunked fused LM head, ``add_fused_lm_head``; on CPU it folds
  4096-token × 32768-vocab logits tiles with torch ops; on CUDA with Triton kernels);
* ``cipo head`` — ``CipoGRPOTrainer``: cipo's ``linear_logprob`` as the fused head, TRL's loss;
* ``cipo head + loss`` — ``CipoGRPOTrainer(cipo_loss=True)``: cipo's head and cipo's ``policy_loss``.

Peak extra memory: PyTorch CPU allocator events during one step (``bench.profiling.cpu_peak_alloc_bytes``; the
parameter gradients the step creates count). Times: median of ``--repeats`` steps after that profiled first one.
Results: ``bench/results/trl_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench._common import RESULTS, MiB, Timer, environment, log, peak_bytes, write_json  # noqa: E402

METHODS = ("trl", "cipo head", "cipo head + loss")


def build_checkpoint(path: Path, vocab: int, hidden: int, layers: int, max_len: int) -> None:
    from cipo.models.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer(path)
    build_tiny_model(path, tok, seed=0, vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                     num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                     max_position_embeddings=max_len)


def make_trainer(method: str, model_dir: str, out_dir: str, batch: int, completion_len: int):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from cipo.integrations.trl import CipoGRPOTrainer

    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=batch, num_generations=batch,
                      max_completion_length=completion_len, report_to="none", use_cpu=True, bf16=False,
                      loss_type="dapo", disable_tqdm=True)
    data = Dataset.from_list([{"prompt": "What is 1+1?"}] * 4)
    common = dict(model=model_dir, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                  train_dataset=data)
    if method == "trl":
        trainer = GRPOTrainer(**common)
    else:
        trainer = CipoGRPOTrainer(**common, cipo_loss=method == "cipo head + loss")
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def make_inputs(batch: int, prompt_len: int, completion_len: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    completion_mask = torch.ones(batch, completion_len, dtype=torch.long)
    completion_mask[1:, completion_len * 3 // 4:] = 0  # ragged lengths, as EOS makes them
    inputs = dict(prompt_ids=torch.randint(6, 103, (batch, prompt_len), generator=g),
                  prompt_mask=torch.ones(batch, prompt_len, dtype=torch.long),
                  completion_ids=torch.randint(6, vocab, (batch, completion_len), generator=g),
                  completion_mask=completion_mask,
                  advantages=torch.linspace(1.0, -1.0, batch))
    inputs["num_items_in_batch"] = completion_mask.sum()
    return inputs


def measure(method: str, model_dir: str, out_dir: str, inputs: dict, batch: int, completion_len: int,
            repeats: int) -> dict:
    trainer = make_trainer(method, model_dir, out_dir, batch, completion_len)
    model = trainer.model
    result: dict = {}

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        result["loss"] = float(loss.detach())

    cpu = torch.device("cpu")
    peak = peak_bytes(step, cpu)  # the first (profiled) step doubles as the warm-up
    grads = [p.grad.detach().double().norm() for p in model.parameters() if p.grad is not None]
    timer = Timer()
    for _ in range(repeats):
        timer.run(step, cpu)
    summary = timer.summary() if hasattr(timer, "summary") else {"times_s": timer.wall}
    times = sorted(timer.wall)
    return {"method": method, "peak_extra_bytes": int(peak), "peak_extra_mib": round(peak / MiB, 1),
            "median_s": round(times[len(times) // 2], 4), "times_s": [round(t, 4) for t in timer.wall],
            "cpu_times_s": [round(t, 4) for t in timer.cpu], "loss": result["loss"],
            "grad_norm": float(torch.stack(grads).norm()), "timer": summary}


def write_markdown(path: Path, data: dict) -> None:
    env, cfg, rows = data["environment"], data["config"], data["results"]
    base = next(r for r in rows if r["method"] == "trl")
    lines = [
        "# One TRL GRPO training step on CPU: TRL 1.16's default vs cipo",
        "",
        f"- Command: `{data['command']}`",
        f"- Machine: {env['device']}; {env['cpu_count']} CPUs, {env['ram_gib']} GiB RAM; {env['platform']}; "
        f"load average at start {env['load_avg']}",
        f"- Commit: `{env['commit']}`" + (" + working-tree changes" if env.get("worktree_changes") else ""),
        f"- Versions: torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, "
        f"trl {data['trl_version']}, triton {env['versions']['triton']}, cipo {env['versions']['cipo']}",
        f"- Date: {data['date']}; wall time {data['wall_s']:.0f} s",
        f"- Step: `GRPOTrainer.compute_loss` + `backward` (loss_type `dapo`, fp32, {cfg['batch']} completions × "
        f"{cfg['completion_len']} tokens ({cfg['loss_tokens']} loss tokens) after a {cfg['prompt_len']}-token prompt; "
        f"tiny Qwen3: vocab {cfg['vocab']}, hidden {cfg['hidden']}, {cfg['layers']} layer(s)). Generation, rewards and "
        "the optimizer update are identical for all methods and left out.",
        "- Peak extra memory: PyTorch CPU allocator events during one step (parameter gradients included); times: "
        f"median of {cfg['repeats']} steps after the profiled first one.",
        "",
        "| method | step time (median) | vs TRL | CPU time vs TRL | peak extra memory | vs TRL | loss | grad norm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cpu_ratio = sorted(r["cpu_times_s"])[len(r["cpu_times_s"]) // 2] / \
            sorted(base["cpu_times_s"])[len(base["cpu_times_s"]) // 2]
        lines.append(f"| {r['method']} | {r['median_s']:.2f} s | {r['median_s'] / base['median_s']:.2f}× | "
                     f"{cpu_ratio:.2f}× | {r['peak_extra_mib']:.0f} MiB | "
                     f"{r['peak_extra_bytes'] / base['peak_extra_bytes']:.2f}× | {r['loss']:.6f} | "
                     f"{r['grad_norm']:.6f} |")
    lines += ["", data["note"], "",
              "TRL 1.16's head on CPU scores every position (labelled or not) and folds 4096-token × 32768-vocab "
              "logits tiles with torch element-wise ops; on CUDA it runs Triton kernels on the labelled positions "
              "only. These CPU ratios therefore say nothing about GPU speed; the memory bound holds on both (cipo's "
              "head keeps one logits tile of a fixed budget: 64 MiB on CPU, 256 MiB on CUDA).", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--completion-len", type=int, default=4096)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run (results not written)")
    parser.add_argument("--out", default=str(RESULTS / "trl_cpu"), help="results path without extension")
    parser.add_argument("--render", action="store_true", help="rewrite the .md from the existing .json only")
    args = parser.parse_args()
    if args.render:
        out = Path(args.out)
        write_markdown(out.with_suffix(".md"), json.loads(out.with_suffix(".json").read_text()))
        return
    if args.quick:
        args.completion_len, args.vocab, args.repeats = 256, 4096, 1
    torch.set_num_threads(args.threads)
    import trl

    t0 = time.perf_counter()
    env = environment(torch.device("cpu"))
    inputs = make_inputs(args.batch, args.prompt_len, args.completion_len, args.vocab)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_checkpoint(model_dir, args.vocab, args.hidden, args.layers, args.prompt_len + args.completion_len + 8)
        for method in METHODS:
            log(f"trl_step: {method} ...")
            rows.append(measure(method, str(model_dir), str(Path(tmp) / "out"), inputs, args.batch,
                                args.completion_len, args.repeats))
            r = rows[-1]
            log(f"  {r['median_s']:.2f} s, peak {r['peak_extra_mib']:.0f} MiB, loss {r['loss']:.6f}")
    base = rows[0]
    same = all(abs(r["loss"] - base["loss"]) <= 1e-5 * abs(base["loss"]) and
               abs(r["grad_norm"] - base["grad_norm"]) <= 1e-5 * base["grad_norm"] for r in rows)
    data = {
        "command": "OMP_NUM_THREADS=1 $(bash scripts/integration_env.sh trl)/bin/python -m bench.trl_step" +
                   (" --quick" if args.quick else ""),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "trl_version": trl.__version__,
        "environment": env,
        "config": {"batch": args.batch, "prompt_len": args.prompt_len, "completion_len": args.completion_len,
                   "loss_tokens": int(inputs["num_items_in_batch"]), "vocab": args.vocab, "hidden": args.hidden,
                   "layers": args.layers, "repeats": args.repeats, "threads": args.threads},
        "results": rows,
        "same_numbers": same,
        "note": ("All methods give the same loss and gradient norm (≤1e-5 relative)." if same else
                 "WARNING: the methods' losses or gradient norms differ by more than 1e-5 relative."),
        "wall_s": time.perf_counter() - t0,
    }
    for r in rows:
        r.pop("timer", None)
    if args.quick:
        print(data["note"], [(r["method"], r["median_s"], r["peak_extra_mib"]) for r in rows])
        return
    out = Path(args.out)
    write_json(out.with_suffix(".json"), data)
    write_markdown(out.with_suffix(".md"), data)
    log(f"trl_step: wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
