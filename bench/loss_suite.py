"""Loss section of the benchmark suites: runs the methods of :mod:`bench.loss_methods` and records the results.

All methods of one shape run in one process, one after the other, each timed against the naive baseline measured in
the same run (:func:`run_shape`); :func:`error_check` measures each method's loss, ``dH``, ``dW`` (and per-token logp
where it has one) against float64 of the same semantics; :func:`small_kernels` times the two kernels without an LM
head next to their torch paths; :func:`plan` says which shapes each suite and part runs.
"""

from __future__ import annotations

import argparse
import os
import time
import traceback
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("CIPO_FORCE_TRITON", "0")  # CPU tensors take the torch path, never the interpreter

import torch  # noqa: E402
from cipo.kernels.linear_logprob_ref import linear_logprob_reference  # noqa: E402

from bench._common import (  # noqa: E402
    Deadline,
    GiB,
    Timer,
    apply_thread_setting,
    available_ram_bytes,
    cuda_kernel_breakdown,
    environment,
    failure_status,
    free_memory,
    is_oom,
    log,
    peak_bytes,
    timed,
    write_json,
)
from bench.loss_methods import (  # noqa: E402
    CONFIG,
    CONFIG_TEXT,
    LAMBDA_CORR,
    MATERIALISING,
    Shape,
    Workload,
    build,
    label,
    liger_reference_loss,
    make_workload,
    naive_logp,
    naive_loss,
    semantics,
    unavailable,
)
from cipo.advantages import group_advantages  # noqa: E402
from cipo.loss import cipo_policy_loss  # noqa: E402

# ----------------------------------------------------------------------------------------------- running


def _naive_bytes_estimate(shape: Shape) -> int:
    """The naive path's peak: ~4 fp32 copies of [T, V] (logits, log-softmax, their gradients) — measured 4.0×."""
    return 4 * shape.tokens * shape.vocab * 4


def run_method(method: str, wl: Workload, deadline: Deadline, quick: bool) -> dict[str, Any]:
    shape, device = wl.shape, wl.device
    row: dict[str, Any] = {"method": method, "label": label(method), "semantics": semantics(method)}
    reason = unavailable(method, device)
    if reason is None and device.type == "cpu" and method in MATERIALISING | {"cce"}:
        avail = available_ram_bytes()
        need = _naive_bytes_estimate(shape)
        if avail is not None and need > 0.7 * avail:
            reason = (f"skipped: needs ~{need / GiB:.1f} GiB for the [T, V] logits and their gradients, "
                      f"{avail / GiB:.1f} GiB available")
    if reason is None and not deadline.allows(5.0):
        reason = "skipped: section time budget spent"
    if reason is not None:
        row["status"] = reason
        return row
    wl.reset()
    try:
        step = build(method, wl)
        if shape.warmup or method in ("compile", "cce"):  # first calls that compile are never timed
            row["first_call_s"] = round(timed(step, device), 4)  # warm-up; includes compilation
            wl.reset()
        timer = Timer()
        c0, t0 = time.process_time(), time.perf_counter()
        peak = peak_bytes(step, device)
        profiled = (time.perf_counter() - t0, time.process_time() - c0)
        grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in (wl.hidden, wl.weight) if t.grad is not None)
        wl.reset()
        row["profiled_run_s"] = round(profiled[0], 4)  # not used for the medians
        for _ in range(shape.repeats):
            if timer.wall and not deadline.allows(2 * max(timer.wall) + 2):
                break
            timer.run(step, device)
            wl.reset()
        row.update(timer.summary())
        if method in shape.profile and device.type == "cuda":
            try:
                row["kernels"] = cuda_kernel_breakdown(step, device)
            except Exception as exc:  # noqa: BLE001 - the profiler is a bonus, never a failure of the method
                row["kernels_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            wl.reset()
        row["peak_extra_bytes"] = int(peak)
        row["grad_bytes"] = int(grad_bytes)
        row["peak_beyond_grads_bytes"] = int(peak - grad_bytes)
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a failing baseline is a result, not a crash
        wl.reset()
        if is_oom(exc):
            row["status"] = "OOM"
        else:
            row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            row["traceback"] = traceback.format_exc(limit=6)
    finally:
        wl.extra.pop("dz", None)
        free_memory(device)
    return row


def run_shape(shape: Shape, device: torch.device, deadline: Deadline, quick: bool) -> dict[str, Any]:
    log(f"[loss] {shape.describe()} on {device}: {', '.join(shape.methods)}")
    out: dict[str, Any] = {"shape": {"tokens": shape.tokens, "hidden": shape.hidden, "vocab": shape.vocab,
                                     "dtype": shape.dtype, "seq_len": shape.seq_len, "tag": shape.tag},
                           "flop_floor_fwd_bwd": 6 * shape.tokens * shape.hidden * shape.vocab, "rows": []}
    try:
        wl = make_workload(shape, device)
    except Exception as exc:  # noqa: BLE001
        out["status"] = "OOM" if is_oom(exc) else f"failed: {type(exc).__name__}: {exc}"
        free_memory(device)
        return out
    out["loss_tokens"] = int(wl.batch.loss_mask.sum())
    for method in shape.methods:
        t0 = time.perf_counter()
        row = run_method(method, wl, deadline, quick)
        out["rows"].append(row)
        med = row.get("median_s")
        peak = row.get("peak_extra_bytes")
        log(f"[loss]   {method:<15} {row['status']:<12.12} "
            f"{'' if med is None else f'{med:8.4f} s'} "
            f"{'' if peak is None else f'{peak / 2**20:9.1f} MiB'}  ({time.perf_counter() - t0:.1f} s)")
    base = next((r for r in out["rows"] if r["method"] == "naive" and r.get("status") == "ok"), None)
    mm = next((r for r in out["rows"] if r["method"] == "matmul" and r.get("status") == "ok"), None)
    for r in out["rows"]:
        if r.get("status") != "ok":
            continue
        if base is not None:
            r["time_vs_naive"] = round(r["median_s"] / base["median_s"], 4)
            if r.get("cpu_median_s") and base.get("cpu_median_s"):
                r["cpu_time_vs_naive"] = round(r["cpu_median_s"] / base["cpu_median_s"], 4)
            r["memory_vs_naive"] = round(r["peak_extra_bytes"] / max(base["peak_extra_bytes"], 1), 4)
        if mm is not None:
            r["time_vs_matmul"] = round(r["median_s"] / mm["median_s"], 4)
    del wl
    free_memory(device)
    return out


# ----------------------------------------------------------------------------------------------- errors


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-300))


def error_check(shape: Shape, device: torch.device, deadline: Deadline) -> dict[str, Any]:
    """Loss, dH, dW and logp of every method vs float64 of the same semantics, on one (smaller) shape."""
    log(f"[error] {shape.describe()} on {device}")
    wl = make_workload(shape, device, seed=1)
    out: dict[str, Any] = {"shape": {"tokens": shape.tokens, "hidden": shape.hidden, "vocab": shape.vocab,
                                     "dtype": shape.dtype, "seq_len": shape.seq_len}, "rows": []}
    m = wl.batch.loss_mask
    # float64 references: our semantics and Liger's, from the same float64 logp.
    h64 = wl.hidden.detach().double().requires_grad_(True)
    w64 = wl.weight.detach().double().requires_grad_(True)
    refs: dict[str, dict[str, torch.Tensor]] = {}
    for sem in ("cipo", "liger"):
        if sem == "cipo":
            ref64 = naive_loss(wl, h64, w64)
            logp64, loss64 = ref64.logp, ref64.loss
        else:
            logp64 = naive_logp(h64, w64, wl.batch.targets)
            loss64 = liger_reference_loss(wl, logp64)
        loss64.backward()
        if float(loss64.detach()) == 0.0 or float(h64.grad.norm()) == 0.0:
            raise RuntimeError(f"error check at {shape.describe()}: the float64 {sem} loss or its gradient is 0; "
                               "the batch needs groups with different rewards")
        refs[sem] = {"loss": loss64.detach(), "logp": logp64.detach(), "dH": h64.grad, "dW": w64.grad}
        h64.grad = w64.grad = None
    out["reference"] = {"cipo_loss": float(refs["cipo"]["loss"]), "liger_loss": float(refs["liger"]["loss"])}
    if shape.dtype != "float64":
        # torch's own low-precision path for the log-prob alone (no timing): log-softmax in the input dtype.
        with torch.no_grad():
            lp = linear_logprob_reference(wl.hidden, wl.weight, wl.batch.targets, CONFIG.temperature)
        err = (lp.double() - refs["cipo"]["logp"]).abs()[m]
        out["rows"].append({"method": "torch_lowp_logsoftmax", "label": f"torch log_softmax in {shape.dtype}",
                            "semantics": "log-prob only", "status": "ok", "logp_max_abs": float(err.max()),
                            "logp_mean_abs": float(err.mean())})
        del lp
    for method in shape.methods:
        row: dict[str, Any] = {"method": method, "label": label(method), "semantics": semantics(method)}
        reason = unavailable(method, device)
        if method == "matmul":
            reason = "n/a: no loss"
        if reason is None and not deadline.allows(5.0):
            reason = "skipped: section time budget spent"
        if reason is not None:
            row["status"] = reason
            out["rows"].append(row)
            continue
        ref = refs["liger" if method == "liger_grpo" else "cipo"]
        row["reference"] = "Liger's GRPO formula in float64" if method == "liger_grpo" else "naive torch in float64"
        wl.reset()
        try:
            res = build(method, wl)()
            row["loss_abs"] = abs(float(res["loss"]) - float(ref["loss"]))
            row["loss_rel"] = row["loss_abs"] / max(abs(float(ref["loss"])), 1e-300)
            row["dH_rel"] = _rel(wl.hidden.grad, ref["dH"])
            row["dW_rel"] = _rel(wl.weight.grad, ref["dW"])
            if res.get("logp") is not None:
                err = (res["logp"].double() - ref["logp"]).abs()[m]
                row["logp_max_abs"] = float(err.max())
                row["logp_mean_abs"] = float(err.mean())
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001
            failure_status(exc, row)
        wl.reset()
        free_memory(device)
        out["rows"].append(row)
        log(f"[error]   {method:<15} {row['status']:<8.8} " + " ".join(
            f"{k}={row[k]:.2e}" for k in ("loss_rel", "dH_rel", "dW_rel", "logp_max_abs") if k in row))
    del wl, refs, h64, w64
    free_memory(device)
    return out


# ----------------------------------------------------------------------------------------------- small kernels


def small_kernels(device: torch.device, deadline: Deadline, quick: bool) -> dict[str, Any]:
    """The two kernels without an LM head, each timed as the product calls it and next to its torch path:
    ``policy_loss`` (the CIPO loss from per-token log-probs, forward + backward; Triton on CUDA, the torch path
    on CPU, so the two rows are the same path there) and ``group_advantage`` (GRPO advantages of the step's
    rewards)."""
    from cipo.kernels.group_advantage_torch import group_advantages_torch

    from cipo.advantages import dense_group_index
    from cipo.loss import StreamPart, flatten_inputs, loss_torch
    from cipo.packing import BASE_STREAM, CORRECTION_STREAM

    tokens, seqs = (8192, 1024) if quick else (65536, 8192)
    wl = make_workload(Shape(tokens, 16, 64, seq_len=tokens // seqs * 1), device, seed=2)
    logp = wl.batch.old_logp.clone().requires_grad_(True)

    def loss_step() -> None:
        logp.grad = None
        loss, _ = cipo_policy_loss(logp, wl.batch, CONFIG, lambda_corr=LAMBDA_CORR, advantages=wl.advantages)
        loss.backward()

    def loss_torch_step() -> None:  # the same call, its torch path forced (what CPU tensors take anyway)
        logp.grad = None
        b = wl.batch
        flat = flatten_inputs(logp, b.old_logp, wl.advantages, b.loss_mask, rollout_logp=b.rollout_logp,
                              cu_seqlens=b.cu_seqlens)
        stream = b.stream[flat.seq_index]
        parts = [StreamPart("base", flat.mask & (stream == BASE_STREAM), 1.0),
                 StreamPart("corr", flat.mask & (stream == CORRECTION_STREAM), LAMBDA_CORR)]
        loss, _ = loss_torch(flat, CONFIG, parts, flat.default_scale)
        loss.backward()

    rewards = wl.batch.reward
    group_index, num_groups = dense_group_index(wl.batch.group_id)
    calls = {
        "policy_loss": (f"cipo_policy_loss fwd+bwd from logp, T={tokens}", loss_step),
        "policy_loss_torch": (f"its torch path (cipo.loss.loss_torch), T={tokens}", loss_torch_step),
        "group_advantage": (f"group_advantages, S={seqs} in groups of 4",
                            lambda: group_advantages(rewards, wl.batch.group_id)),
        "group_advantage_torch": (f"its torch path (group_advantages_torch), S={seqs}",
                                  lambda: group_advantages_torch(rewards, group_index, num_groups, "grpo", 1e-6)),
    }
    rows = []
    for name, (what, fn) in calls.items():
        row: dict[str, Any] = {"kernel": name, "what": what}
        if not deadline.allows(2.0):
            row["status"] = "skipped: section time budget spent"
            rows.append(row)
            continue
        timed(fn, device)  # warm-up: compilation, first-call allocations
        timer = Timer()
        for _ in range(3 if quick else 10):
            timer.run(fn, device)
        row.update(timer.summary())
        row["status"] = "ok"
        rows.append(row)
        log(f"[small]   {name:<20} {row['median_s'] * 1e3:9.3f} ms")
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------- plans


CPU_METHODS = ("naive", "compile", "linear_logprob", "fused", "liger_grpo", "cce", "matmul")
# The GPU sweep leaves out the methods that compile per shape (torch.compile; Liger's GRPO loss, compiled=True):
# their compile time would spend the sweep's share of the 8-minute budget. Liger GRPO is timed at the target shapes.
GPU_METHODS = ("matmul", "naive", "fused", "linear_logprob", "cce", "liger_flce")


def plan(suite: str, part: str, quick: bool) -> tuple[list[Shape], Optional[Shape]]:
    """(timed shapes, error-check shape) of a suite's loss section ``part``."""
    if suite == "cpu":
        if part == "smollm2":
            # SmolLM2-135M-Instruct's tied head (H 576, V 49152): is the fused loss no slower than the unfused one
            # there? fp32 (this CPU's training dtype) at the trainer's 1024-token micro-batch and 4x it; bf16 at 256
            # tokens, once: without bf16 instructions a bf16 GEMM here runs on one core at a few GFLOP/s (a 1024-token
            # call took ~4 min).
            methods = ("naive", "fused", "linear_logprob")
            shapes = [Shape(T, 576, 49152, "float32", methods=methods, repeats=3, warmup=True, tag="smollm2")
                      for T in ((1024,) if quick else (1024, 4096))]
            shapes.append(Shape(256, 576, 49152, "bfloat16", methods=methods[:2], repeats=1, warmup=False,
                                tag="smollm2"))
            return shapes, Shape(1024, 576, 49152, methods=methods, tag="error")
        if quick:
            # warm-up (first calls pay page faults and library start-up: +75 % measured), profiled run, one timed run
            s = Shape(1024, 256, 32000, methods=CPU_METHODS, repeats=1, warmup=True, tag="quick")
            return [s], s
        # Sized for ~13 min on 2 shared cores (Liger's chunked loop is the slowest row).
        target = Shape(8192, 256, 32000, methods=CPU_METHODS, repeats=3, warmup=False, tag="cpu-target")
        sweep = [Shape(T, 256, V, methods=CPU_METHODS, repeats=2, warmup=False, tag="sweep")
                 for V, T in ((32000, 1024), (32000, 4096), (151936, 1024))]
        return [target, *sweep], Shape(1024, 256, 32000, methods=CPU_METHODS, tag="error")
    if suite == "gpu":
        issue3 = ("matmul", "naive", "fused", "fused_fp32", "linear_logprob", "liger_grpo", "cce", "liger_flce")
        if part == "targets":
            shapes = [Shape(T, H, 151936, "bfloat16", seq_len=1024, methods=issue3, repeats=5, tag="issue-3")
                      for T, H in ((8192, 4096),) + (() if quick else ((32768, 4096), (8192, 2560), (32768, 2560)))]
            if not quick:
                shapes.append(Shape(8192, 4096, 151936, "float32", seq_len=1024,
                                    methods=("matmul", "naive", "fused", "linear_logprob"), repeats=3, tag="fp32"))
            return shapes, Shape(2048, 4096, 151936, "bfloat16", seq_len=256, methods=issue3, tag="error")
        if part == "tiling":
            # Token chunks (6·THV, fp32 or weight-dtype dW sum, two chunk sizes) vs vocab slabs (8·THV) at the
            # GPU target shapes: the numbers behind the automatic rule (choose_tiling in
            # kernels/fused_linear_policy_loss.py).
            variants = ("matmul", "fused_vocab", "fused_token_c384", "fused_token_c1024", "fused_token_c384_wacc",
                        "fused_token_c1024_wacc", "fused_token_c2048_wacc")
            shapes = [Shape(T, H, 151936, "bfloat16", seq_len=1024, methods=variants, repeats=3, tag="tiling")
                      for T, H in ((8192, 4096),) + (() if quick else ((8192, 2560), (32768, 4096)))]
            shapes[0].profile = variants  # where each variant's time goes, kernel by kernel
            # 8192 tokens: 4 to 21 chunks, so the weight-dtype dW sum's rounding shows as it would at the targets
            return shapes, Shape(8192, 4096, 151936, "bfloat16", seq_len=256, methods=variants[1:], tag="error")
        if part == "sweep":
            Ts = (1024, 8192) if quick else (1024, 2048, 4096, 8192, 16384, 32768)
            shapes = [Shape(T, 4096, V, "bfloat16", seq_len=1024, methods=GPU_METHODS, repeats=3, tag="sweep")
                      for V in (32000, 151936) for T in Ts]
            return sorted(shapes, key=lambda s: s.tokens * s.vocab), None  # cheapest first: the budget may end it
    raise ValueError(f"unknown suite/part {suite}/{part}")


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="loss section of the benchmark suites")
    ap.add_argument("--suite", choices=("cpu", "gpu"), required=True)
    ap.add_argument("--part", default="targets", choices=("targets", "tiling", "sweep", "smollm2"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated methods to leave out (recorded as skipped)")
    ap.add_argument("--deadline-s", type=float, default=None)
    ap.add_argument("--device", default=None, help="override the suite's device (e.g. cpu, to test the GPU plan)")
    ap.add_argument("--shrink", type=int, default=1, help="divide T and V by this (testing the plan on CPU)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    apply_thread_setting()
    device = torch.device(args.device or ("cuda" if args.suite == "gpu" else "cpu"))
    deadline = Deadline(args.deadline_s)
    skip = {s for s in args.skip.split(",") if s}
    shapes, err_shape = plan(args.suite, args.part, args.quick)
    if args.shrink > 1:
        for s in shapes + ([err_shape] if err_shape else []):
            s.tokens, s.vocab = max(s.tokens // args.shrink, 2 * 64), max(s.vocab // args.shrink, 64)
            s.hidden, s.seq_len = max(s.hidden // args.shrink, 16), 64
    result: dict[str, Any] = {"section": f"loss-{args.part}", "config": CONFIG_TEXT, "env": environment(device),
                              "shapes": [], "error": None, "skipped_methods": sorted(skip)}

    def strip(s: Shape) -> Shape:
        s.methods = tuple(m for m in s.methods if m not in skip)
        return s

    t0 = time.perf_counter()
    for shape in shapes:
        result["shapes"].append(run_shape(strip(shape), device, deadline, args.quick))
        write_json(args.out, result)  # partial results survive a timeout
        if shape.tag in ("issue-3", "tiling", "quick") and err_shape is not None and result["error"] is None:
            result["error"] = error_check(strip(err_shape), device, deadline)
            write_json(args.out, result)
    if err_shape is not None and result["error"] is None:
        result["error"] = error_check(strip(err_shape), device, deadline)
    if args.part == "targets":
        result["small_kernels"] = small_kernels(device, deadline, args.quick)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["env"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.out, result)


if __name__ == "__main__":
    main()
