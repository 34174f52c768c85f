"""Trainer section: one policy update (packed forward + loss + backward) on correction-shaped sequences.

A step is what ``CIPOTrainer._update_policy`` does for one micro-batch, built from the same pieces
(``packed_hidden_states``, ``lm_head_weight``, ``fused_linear_policy_loss`` / ``materialized_policy_loss``), on a
synthetic packed batch — no rollouts, no optimizer step. Each sequence is correction-shaped: the correction prompt
(question + the failed trajectory, half of the context) followed by the refinement (the other half, the only loss
tokens); the ``rollouts`` sequences of a step (2 in --quick, 1 otherwise) share the prompt (one correction group,
on-policy).

Four configurations per context length: fused loss on/off (off = ``materialized_policy_loss``: full fp32 logits,
what verl does by default) × gradient checkpointing on/off (``use_reentrant=False``). The fused loss computes only
the loss rows (the refinement); the materialised path computes logits for every token, as an unfused trainer does.

* CPU: a small Qwen3 (``CPU_MODEL``), tokens/s and peak extra memory vs context length.
* GPU: a Qwen3-4B-shaped model (``QWEN3_4B``, random bf16 weights, tied embeddings), one sequence per step; the
  context doubles from 4k until the step runs out of memory: the longest context that fits, per configuration
  (weights + gradients only: no optimizer state — a real run adds AdamW's, or shards them).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("CIPO_FORCE_TRITON", "0")

import torch  # noqa: E402

from bench._common import (  # noqa: E402
    Deadline,
    Timer,
    apply_thread_setting,
    environment,
    failure_status,
    free_memory,
    log,
    peak_bytes,
    sync,
    timed,
    write_json,
)
from cipo.config import PolicyLossConfig  # noqa: E402
from cipo.packing import CORRECTION_STREAM, PackedBatch, SequenceSample  # noqa: E402

CPU_MODEL = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, max_position_embeddings=16384, tie_word_embeddings=False)
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
CONFIGS = (("fused", True, True), ("fused", True, False), ("materialised", False, True), ("materialised", False, False))
LOSS_CONFIG = PolicyLossConfig()  # verl defaults: token-mean, clip 0.2, dual-clip 3, no KL/TIS/entropy


def build_model(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if device.type == "cpu" and dtype == torch.float32:
        from cipo.models.tiny import build_tiny_model, build_tiny_tokenizer

        return build_tiny_model(None, build_tiny_tokenizer(), seed=0, **spec)
    config = Qwen3Config(**spec, dtype=str(dtype).replace("torch.", ""))
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def correction_batch(context: int, rollouts: int, vocab: int, device: torch.device, seed: int = 0) -> PackedBatch:
    """``rollouts`` sequences of ``context`` tokens: a shared correction prompt (question + failed trajectory, half
    the context) and a refinement each (the other half); rewards alternate 1, 0 (one correction group)."""
    gen = torch.Generator().manual_seed(seed)
    prompt_len = context // 2
    prompt = torch.randint(0, vocab, (prompt_len,), generator=gen)
    seqs = [SequenceSample(prompt, torch.randint(0, vocab, (context - prompt_len,), generator=gen),
                           reward=float(i % 2 == 0), group_id=0, stream=CORRECTION_STREAM, prefix_id=0)
            for i in range(rollouts)]
    return PackedBatch.from_sequences(seqs).to(device)


def make_step(model: torch.nn.Module, batch: PackedBatch, fused: bool):
    from cipo.advantages import group_advantages
    from cipo.trainer.backend import materialized_policy_loss
    from cipo.trainer.forward import lm_head_weight, packed_hidden_states

    weight = lm_head_weight(model)
    adv = group_advantages(batch.reward, batch.group_id)

    def step() -> None:
        hidden = packed_hidden_states(model, batch.input_ids, batch.position_ids)
        if fused:
            from cipo import fused_linear_policy_loss

            loss, _ = fused_linear_policy_loss(hidden, weight, batch, LOSS_CONFIG, lambda_corr=1.0, advantages=adv)
        else:
            loss, _ = materialized_policy_loss(hidden, weight, batch, LOSS_CONFIG, lambda_corr=1.0, advantages=adv)
        loss.backward()

    return step


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()  # checkpointing applies in training mode only (Qwen3 has no dropout: same maths)


def measure(model: torch.nn.Module, batch: PackedBatch, fused: bool, device: torch.device, repeats: int,
            deadline: Deadline, warmup: bool) -> dict[str, Any]:
    """Time ``repeats`` steps and measure the peak extra memory of one.

    CPU: the profiled run (memory events) comes first and doubles as the warm-up; with ``repeats == 0`` it is also
    the timed run. CUDA: an optional warm-up (Triton compilation, cuBLAS handles), then each timed run also gives
    the peak (``max_memory_allocated`` is free to read)."""
    step = make_step(model, batch, fused)
    row: dict[str, Any] = {"tokens": batch.num_tokens, "loss_tokens": int(batch.loss_mask.sum())}
    timer = Timer()
    try:
        model.zero_grad(set_to_none=True)
        free_memory(device)
        if device.type == "cuda":
            if warmup:
                row["first_call_s"] = round(timed(step, device), 4)
                model.zero_grad(set_to_none=True)
                free_memory(device)
            before = torch.cuda.memory_allocated(device)
            peak = 0
            for _ in range(max(repeats, 1)):
                if timer.wall and not deadline.allows(2 * max(timer.wall) + 2):
                    break
                torch.cuda.reset_peak_memory_stats(device)
                timer.run(step, device)
                peak = max(peak, torch.cuda.max_memory_allocated(device) - before)
                model.zero_grad(set_to_none=True)
            row["peak_allocated_gib"] = round((before + peak) / 2**30, 2)
        else:
            c0, t0 = time.process_time(), time.perf_counter()
            peak = peak_bytes(step, device)
            profiled = (time.perf_counter() - t0, time.process_time() - c0)
            model.zero_grad(set_to_none=True)
            if repeats == 0:  # quick: the profiled run is the timed one
                timer.add(*profiled)
                row["timed_while_profiled"] = True
            for _ in range(repeats):
                if timer.wall and not deadline.allows(2 * max(timer.wall) + 2):
                    break
                timer.run(step, device)
                model.zero_grad(set_to_none=True)
        row.update(timer.summary())
        row["tokens_per_s"] = round(batch.num_tokens / row["median_s"], 1) if timer.wall else None
        row["peak_extra_bytes"] = int(peak)
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001
        failure_status(exc, row, traceback_limit=6)
    finally:
        model.zero_grad(set_to_none=True)
        free_memory(device)
    return row


def run(suite: str, quick: bool, device: torch.device, deadline: Deadline, shrink: int = 1) -> dict[str, Any]:
    gpu = suite == "gpu"
    spec = dict(QWEN3_4B if gpu else CPU_MODEL)
    if quick and not gpu:
        spec["num_hidden_layers"] = 2
    if shrink > 1:  # testing the GPU plan on a CPU: same code, small model
        spec.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, vocab_size=4096)
    dtype = torch.bfloat16 if gpu and shrink == 1 else torch.float32
    t0 = time.perf_counter()
    model = build_model(spec, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {"section": "trainer", "env": environment(device), "model": {
        **spec, "dtype": str(dtype), "parameters": n_params, "build_s": round(time.perf_counter() - t0, 1)},
        "loss_config": "verl defaults (token-mean, clip 0.2, dual-clip 3), on-policy, λ = 1", "rows": []}
    if gpu:
        contexts = [4096 * 2**k for k in range(5)] if shrink == 1 else [256, 512, 1024]
        rollouts, repeats = 1, 1
    else:
        contexts = [256, 512] if quick else [1024, 2048, 4096]
        rollouts, repeats = (2, 0) if quick else (1, 2)  # full: one sequence per step keeps 4k contexts in budget
    out["rollouts_per_step"] = rollouts
    out["mode"] = "longest context that fits (doubling until OOM)" if gpu else "fixed context lengths"
    # On GPU the configurations that reach long contexts go first, so the time budget is spent on them.
    configs = sorted(CONFIGS, key=lambda c: not c[2]) if gpu else CONFIGS
    for name, fused, ckpt in configs:
        set_checkpointing(model, ckpt)
        last_s = None
        for i, context in enumerate(contexts):
            # the next step costs ~2-4x the last (linear layers x2, attention x4): skip it if it cannot finish
            needed = 10.0 if last_s is None else 4 * last_s + 5
            if not deadline.allows(needed):
                out["rows"].append({"loss": name, "fused": fused, "checkpointing": ckpt, "context": context,
                                    "status": f"skipped: section time budget (next step estimated {needed:.0f} s)"})
                break
            batch = correction_batch(context, rollouts, spec["vocab_size"], device)
            row = {"loss": name, "fused": fused, "checkpointing": ckpt, "context": context,
                   **measure(model, batch, fused, device, repeats, deadline, warmup=gpu and i == 0)}
            del batch
            last_s = row.get("median_s")
            out["rows"].append(row)
            tps, peak = row.get("tokens_per_s"), row.get("peak_extra_bytes")
            log(f"[trainer] {name:<12} ckpt={'on ' if ckpt else 'off'} context={context:<6} {row['status']:<8.8} "
                + ("" if tps is None else f"{tps:10.1f} tok/s ") + ("" if peak is None else f"{peak / 2**20:9.0f} MiB"))
            if row["status"] != "ok" and gpu:
                break  # longer contexts will not fit either
    if gpu:
        out["longest_fit"] = {
            f"{name}, checkpointing {'on' if ckpt else 'off'}": max(
                (r["context"] for r in out["rows"] if r["fused"] == fused and r["checkpointing"] == ckpt
                 and r["status"] == "ok"), default=None)
            for name, fused, ckpt in CONFIGS}
    sync(device)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="trainer section of the benchmark suites")
    ap.add_argument("--suite", choices=("cpu", "gpu"), required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--deadline-s", type=float, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--shrink", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    apply_thread_setting()
    device = torch.device(args.device or ("cuda" if args.suite == "gpu" else "cpu"))
    write_json(args.out, run(args.suite, args.quick, device, Deadline(args.deadline_s), args.shrink))


if __name__ == "__main__":
    main()
