"""Long correction contexts: memory of a training step vs context length, with each switch on and off.

    python -m bench.long_context                 # CPU sweep → bench/results/long_context_cpu.{json,md,png}
    python -m bench.long_context --quick         # small shapes, one run each (CI smoke test, < 1 min)
    python -m bench.long_context --suite gpu     # the GPU search (bench/gpu_suite.sh, GPU_SUITE_LONG_CONTEXT_S)

The workload is one correction group per micro-batch: a correction prompt of ``context`` tokens (the problem + a
failed attempt), sampled ``rollouts`` times with responses of ``response`` tokens (docs/LONG_CONTEXT.md).
The plain packed micro-batch holds ``rollouts × (context + response)`` tokens; with ``actor.shared_prefix`` the
forward holds ``context + rollouts × response``.

A step is what the trainer does per micro-batch: ``PolicyModule`` (the backend's module: packed or shared-prefix
forward, then the fused loss, or the materialised one) and the backward; no optimizer step (its state does not
depend on the tokens). Configurations (the baseline — today's defaults: fused loss, plain packing — runs in the
same process, on the same batches):

* ``baseline`` — fused loss, plain packing, no checkpointing, no tiling
* ``shared_prefix`` / ``tiled_mlp`` / ``checkpointing`` — the baseline with that one switch on
* ``materialised_loss`` — the baseline with ``actor.fused_loss: false`` (fp32 logits for every token)
* ``all`` — shared prefix + TiledMLP + checkpointing + fused loss
* ``all_offload`` — ``all`` + DeepSpeed's checkpoint offload (GPU only: on CPU it moves nothing)

CPU: a small Qwen3 (fp32), peak extra memory of one step (PyTorch's CPU allocator, profiler memory events; weights
excluded, gradients included — bench/_common.py), its wall time, and the analytic model's prediction
(:func:`memory_model`) next to it. GPU (prepared, not run here): a Qwen3-4B-shaped model in bf16; per
configuration the step's peak at two sizes, then for each cap in ``--caps`` (GiB, via
``torch.cuda.set_per_process_memory_fraction``) the largest micro-batch that trains, found by doubling the context
and one bisection between the last fit and the first OOM. The Markdown table and the plot: bench/long_context_report.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("CIPO_FORCE_TRITON", "0")

import torch  # noqa: E402

from bench._common import (  # noqa: E402
    Deadline,
    apply_thread_setting,
    environment,
    failure_status,
    free_memory,
    log,
    peak_bytes,
    sync,
    write_json,
)
from bench.long_context_report import write_report  # noqa: E402
from cipo.config import PolicyLossConfig  # noqa: E402
from cipo.packing import CORRECTION_STREAM, PackedBatch, SequenceSample  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CPU_MODEL = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, max_position_embeddings=32768, tie_word_embeddings=False)
QUICK_MODEL = dict(vocab_size=4096, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=False)
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=1048576,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)

CONFIGS: dict[str, dict[str, bool]] = {
    "baseline": dict(fused=True, shared=False, tiled=False, ckpt=False),
    "shared_prefix": dict(fused=True, shared=True, tiled=False, ckpt=False),
    "tiled_mlp": dict(fused=True, shared=False, tiled=True, ckpt=False),
    "checkpointing": dict(fused=True, shared=False, tiled=False, ckpt=True),
    "materialised_loss": dict(fused=False, shared=False, tiled=False, ckpt=False),
    "all": dict(fused=True, shared=True, tiled=True, ckpt=True),
    # + DeepSpeed's checkpoint offload: acts on GPU tensors only, so the CPU sweep leaves it out
    "all_offload": dict(fused=True, shared=True, tiled=True, ckpt=True, offload=True),
}
CPU_CONFIGS = [name for name, sw in CONFIGS.items() if not sw.get("offload")]
LOSS_CONFIG = PolicyLossConfig()  # verl defaults: token-mean, clip 0.2, dual-clip 3
# fitted on the CPU sweep: fp32 logits + log-softmax + gradient per loss row and vocabulary entry, partly overlapping
MATERIALISED_BYTES_PER_ROW_V = 11.0
# The memory model on a GPU (assumptions, not measurements): flash/flex attention keeps no T × T mask and takes
# grouped K/V heads natively; the fused loss's working set is taken as 1 GiB (logits tile + buffers at V = 151936).
GPU_MODEL_ASSUMPTIONS = dict(dense_mask=False, repeat_kv=False, loss_tile_bytes=2.0**30)

# ----------------------------------------------------------------------------------------------- the memory model


def memory_model(spec: dict[str, Any], *, context: int, rollouts: int, response: int, fused: bool, shared: bool,
                 tiled: bool, ckpt: bool, act_bytes: int, param_count: Optional[int] = None,
                 tiled_shards: int = 0, dense_mask: bool = True, repeat_kv: bool = True,
                 loss_tile_bytes: float = 2**26, offload: bool = False, sp: int = 1) -> dict[str, float]:
    """Predicted extra memory (bytes) of one training step beyond the weights, by component.

    What autograd keeps per token of the forward stream and per layer of the HF Qwen3 decoder (counted with
    ``saved_tensors_hooks`` on this CPU, sdpa, fp32), in elements of ``a = act_bytes`` bytes:

    * ``6H`` — the layer input and the mid-layer residual, and each RMSNorm's normalised value and output (×2);
    * ``4·nh·d + 2·nkv·d`` — q projection, q norm (normalised), q after rotary, attention output (= o_proj
      input); k projection and k norm;
    * ``2·nh·d`` — K and V repeated to every head for sdpa (``repeat_kv``; ``2·nkv·d`` when the kernel takes
      grouped heads natively);
    * ``4I`` — gate, SiLU(gate), up, SiLU(gate)·up.

    On CPU, sdpa with an explicit mask (a packed stream of several sequences, or a shared prefix) keeps a float32
    copy of the ``T × T`` mask per layer (``dense_mask``; flash-attn varlen and flex_attention keep none).

    The peak is ``gradients + persistent + max(loss working set, one layer's recompute)``: without checkpointing
    every layer's activations persist; with it only each layer's input (``layers·H``) and the recomputed layer's
    activations exist at once, and the loss's working set is not alive at the same time as the recompute. The
    fused loss's working set is one fp32 logits tile of at most ``loss_tile_bytes`` (the CPU tile budget, or an
    assumed size on a GPU) and at most the loss rows; the materialised loss keeps fp32 logits, their log-softmax
    and the gradient for every loss row (``MATERIALISED_BYTES_PER_ROW_V`` bytes per row and vocabulary entry, a
    factor fitted on the CPU sweep).
    TiledMLP removes the ``4I`` term (recomputed one slice at a time in the backward). Checkpoint offload (GPU)
    moves the layer inputs to host memory but the newest two (DeepSpeed keeps the last and one in flight). Shared
    prefix shrinks the stream from ``N = M(C+R)`` to ``L = C + M·R`` tokens and the loss rows to the view's
    ``M(R+1)``. Weight gradients (``P·a``) are included, optimizer state is not. How close it comes to measured
    peaks (CPU sweep, and the H100 trainer-suite run): docs/LONG_CONTEXT.md.

    Ulysses sequence parallelism over ``sp`` ranks (per rank): every per-token term holds ``ceil(T/sp)`` tokens
    (between the all-to-alls a rank holds all ``T`` tokens of ``1/sp`` of the heads: the same count); the mask,
    built from the gathered ``position_ids``, is the whole stream's (sdpa on CPU: always, even for one sequence);
    the gathered final hidden states and their gradient add ``2·T·H``; the loss rows split over the ranks.
    """
    h, inter = spec["hidden_size"], spec["intermediate_size"]
    nh, nkv, d = spec["num_attention_heads"], spec["num_key_value_heads"], spec["head_dim"]
    layers, vocab = spec["num_hidden_layers"], spec["vocab_size"]
    plain = rollouts * (context + response)
    tokens = context + rollouts * response if shared else plain
    full = tokens  # the whole stream (the attention mask's size under sequence parallelism)
    tokens = math.ceil(full / sp)  # this rank's shard
    per_layer = 6 * h + 4 * nh * d + 2 * nkv * d + (2 * nh * d if repeat_kv else 2 * nkv * d)
    if not tiled:
        per_layer += 4 * inter
    masked = dense_mask and (shared or rollouts > 1 or sp > 1)
    mask_layer = 4.0 * full * full if masked else 0.0  # the float copy sdpa keeps, per layer
    edges = 3 * h * tokens * act_bytes  # embeddings output, final norm
    if sp > 1:
        edges += 2 * h * full * act_bytes  # the gathered final hidden states and their gradient
    if ckpt:
        kept = min(layers, 2) if offload else layers
        persistent = kept * h * tokens * act_bytes + edges + (full * full if masked else 0)
        recompute = per_layer * tokens * act_bytes + mask_layer
    else:
        persistent = layers * (per_layer * tokens * act_bytes + mask_layer) + edges + (full * full if masked else 0)
        recompute = 0.0
    if tiled:
        shards = max(tiled_shards or math.ceil(tokens / h), 1)
        recompute += 4 * inter * math.ceil(tokens / shards) * act_bytes
    loss_rows = math.ceil((rollouts * (response + 1) if shared else plain) / sp)
    loss = min(loss_tile_bytes, 4.0 * vocab * loss_rows) if fused else MATERIALISED_BYTES_PER_ROW_V * vocab * loss_rows
    params = param_count if param_count is not None else _param_count(spec)
    out = {"gradients": float(params * act_bytes), "activations": float(persistent),
           "transient": float(max(loss, recompute)), "loss": float(loss), "recompute": float(recompute)}
    out["total"] = out["gradients"] + out["activations"] + out["transient"]
    out["tokens_plain"] = plain
    out["tokens_forward"] = full
    return out


def _param_count(spec: dict[str, Any]) -> int:
    h, inter = spec["hidden_size"], spec["intermediate_size"]
    nh, nkv, d = spec["num_attention_heads"], spec["num_key_value_heads"], spec["head_dim"]
    layer = h * (nh * d) * 2 + h * (nkv * d) * 2 + 3 * h * inter + 2 * h + 2 * d
    emb = spec["vocab_size"] * h * (1 if spec.get("tie_word_embeddings") else 2)
    return spec["num_hidden_layers"] * layer + emb + h


# ----------------------------------------------------------------------------------------------- the step


def build_model(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from bench.trainer_suite import build_model as build

    model = build(spec, device, dtype)
    model.config.use_cache = False
    return model.train()


def correction_group(context: int, rollouts: int, response: int, vocab: int, device: torch.device,
                     seed: int = 0) -> PackedBatch:
    """One correction group: a shared prompt of ``context`` tokens and ``rollouts`` responses of ``response``
    tokens; rewards alternate 1, 0 (non-zero advantages)."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (context,), generator=gen)
    seqs = [SequenceSample(prompt, torch.randint(0, vocab, (response,), generator=gen), reward=float(i % 2 == 0),
                           group_id=0, stream=CORRECTION_STREAM, prefix_id=0) for i in range(rollouts)]
    return PackedBatch.from_sequences(seqs).to(device)


def remove_tiled_mlp(model: torch.nn.Module) -> int:
    """Undo :func:`cipo.trainer.long_context.apply_tiled_mlp` (each MLP's class forward again; it marks the MLPs it
    patched with ``_cipo_tiled``), so that one model serves every configuration; returns how many were restored."""
    restored = 0
    for module in model.modules():
        if getattr(module, "_cipo_tiled", False):
            del module.forward
            del module._cipo_tiled
            restored += 1
    return restored


def configure(model: torch.nn.Module, switches: dict[str, bool]) -> None:
    from cipo.trainer.long_context import apply_tiled_mlp

    remove_tiled_mlp(model)
    if switches["tiled"]:
        apply_tiled_mlp(model)
    if switches["ckpt"]:  # (offload needs it: it offloads the checkpointed layer inputs)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()


def make_step(model: torch.nn.Module, batch: PackedBatch, switches: dict[str, bool],
              sequence_parallel: Any = None) -> Callable[[], float]:
    """One micro-batch's forward + loss + backward as the trainer runs it; with ``sequence_parallel`` (a
    :class:`cipo.trainer.sequence_parallel.UlyssesSP`) this rank's part of it (the loss: its share of the rows)."""
    from cipo.advantages import group_advantages
    from cipo.trainer.backend import PolicyModule
    from cipo.trainer.long_context import CheckpointOffload
    from cipo.trainer.mini_batch import stream_normalizers

    module = PolicyModule(model, shared_prefix=switches["shared"], sequence_parallel=sequence_parallel)
    adv = group_advantages(batch.reward, batch.group_id)
    offload = CheckpointOffload(switches.get("offload", False))
    loss_rows = sequence_parallel.loss_rows(batch) if sequence_parallel is not None else None
    # the micro-batch's own counts, passed as the trainer passes a step's: a rank's share of the rows is then
    # normalised by the whole micro-batch's
    base_norm, corr_norm = stream_normalizers(batch, LOSS_CONFIG.loss_agg_mode)

    def step() -> float:
        offload.begin()
        try:
            loss, _ = module(batch, LOSS_CONFIG, fused=switches["fused"], lambda_corr=1.0, advantages=adv,
                             loss_rows=loss_rows, base_normalizer=base_norm, corr_normalizer=corr_norm)
            loss.backward()
        finally:
            offload.end()
        return float(loss.detach())

    return step


def measure(model: torch.nn.Module, batch: PackedBatch, switches: dict[str, bool], device: torch.device,
            timed_runs: int, sequence_parallel: Any = None) -> dict[str, Any]:
    """Peak extra memory of one step (the profiled run, which is also the warm-up), then ``timed_runs`` timed.
    With ``sequence_parallel`` every rank of the group calls it; the loss and gradient norm are the group's (sums
    over its ranks), the peak this rank's."""
    step = make_step(model, batch, switches, sequence_parallel)
    row: dict[str, Any] = {}
    losses: list[float] = []
    try:
        model.zero_grad(set_to_none=True)
        free_memory(device)
        t0 = time.perf_counter()
        row["peak_extra_bytes"] = int(peak_bytes(lambda: losses.append(step()), device))
        row["profiled_s"] = round(time.perf_counter() - t0, 3)
        # the gradient's norm: the same in every configuration (the on-policy loss itself is ~0 with equal lengths)
        grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
        if sequence_parallel is not None:  # each rank holds its part of the gradient: the step's is their sum
            for g in grads:
                torch.distributed.all_reduce(g, group=sequence_parallel.group)
        row["grad_norm"] = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        walls = []
        for _ in range(timed_runs):
            model.zero_grad(set_to_none=True)
            sync(device)
            t0 = time.perf_counter()
            losses.append(step())
            sync(device)
            walls.append(time.perf_counter() - t0)
        row["wall_s"] = [round(w, 4) for w in walls]
        row["median_s"] = round(sorted(walls)[len(walls) // 2], 4) if walls else None
        row["loss"] = losses[0]
        if sequence_parallel is not None:
            row["loss"] = sum(sequence_parallel_values(losses[0], sequence_parallel))
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001
        failure_status(exc, row, traceback_limit=6)
    finally:
        model.zero_grad(set_to_none=True)
        free_memory(device)
    return row


def sequence_parallel_values(value: float, sequence_parallel: Any) -> list[float]:
    """``value`` of every rank of this rank's sequence-parallel group, in rank order."""
    out: list[Any] = [None] * sequence_parallel.size
    torch.distributed.all_gather_object(out, value, group=sequence_parallel.group)
    return out


# ----------------------------------------------------------------------------------------------- CPU sweep


def run_cpu(quick: bool, deadline: Deadline, configs: list[str]) -> dict[str, Any]:
    device = torch.device("cpu")
    spec = dict(QUICK_MODEL if quick else CPU_MODEL)
    contexts = [64, 128] if quick else [256, 512, 1024, 2048]
    rollouts, response = (2, 16) if quick else (4, 128)
    timed_runs = 0 if quick else 1
    model = build_model(spec, device, torch.float32)
    params = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {
        "suite": "cpu", "quick": quick, "env": environment(device),
        "model": {**spec, "dtype": "torch.float32", "parameters": params, "attn_implementation": "sdpa"},
        "workload": {"contexts": contexts, "rollouts": rollouts, "response": response,
                     "what": "one correction group per micro-batch: a shared prompt of `context` tokens, "
                             "`rollouts` responses of `response` tokens"},
        "configs": {name: CONFIGS[name] for name in configs}, "rows": []}
    for context in contexts:
        batch = correction_group(context, rollouts, response, spec["vocab_size"], device)
        for name in configs:
            switches = CONFIGS[name]
            if not deadline.allows(5.0):
                out["rows"].append({"config": name, "context": context, "status": "skipped: time budget"})
                continue
            configure(model, switches)
            row = {"config": name, "context": context, "tokens_plain": batch.num_tokens,
                   **measure(model, batch, switches, device, timed_runs)}
            predict_row(spec, row, rollouts, response, params)
            if row["status"] == "ok":
                row["bytes_per_plain_token"] = round(row["peak_extra_bytes"] / batch.num_tokens, 1)
            out["rows"].append(row)
            log(f"[long_context] {name:<18} C={context:<5} N={batch.num_tokens:<6} L={row['tokens_forward']:<6} "
                f"{row['status']:<6.6} "
                + (f"{row['peak_extra_bytes'] / 2**20:8.1f} MiB (model {row['predicted_bytes'] / 2**20:8.1f}) "
                   f"{row['profiled_s']:.2f} s profiled" if row["status"] == "ok" else ""))
        del batch
    configure(model, CONFIGS["baseline"])
    out["check"] = loss_check(out["rows"])
    return out


def predict_row(spec: dict[str, Any], row: dict[str, Any], rollouts: int, response: int, params: int) -> None:
    """Fill ``row``'s memory-model fields (CPU rows: fp32, sdpa with a dense mask, 64 MiB fused-loss tile)."""
    switches = CONFIGS[row["config"]]
    pred = memory_model(spec, context=row["context"], rollouts=rollouts, response=response, act_bytes=4,
                        param_count=params, fused=switches["fused"], shared=switches["shared"],
                        tiled=switches["tiled"], ckpt=switches["ckpt"], offload=switches.get("offload", False))
    row["tokens_forward"] = pred["tokens_forward"]
    row["predicted_bytes"] = int(pred["total"])
    row["predicted"] = {k: int(v) for k, v in pred.items() if k not in ("tokens_plain", "tokens_forward")}


def repredict(data: dict[str, Any]) -> None:
    """Recompute every prediction of a result JSON with the current :func:`memory_model`."""
    if data["suite"] == "cpu":
        w = data["workload"]
        for row in data["rows"]:
            if "context" in row and row["config"] in CONFIGS:
                predict_row(data["model"], row, w["rollouts"], w["response"], data["model"]["parameters"])
    lw = data.get("limits_workload")
    if lw:
        caps = [float(c) for c in data["predicted_limits"]]
        data["predicted_limits"] = predicted_limits(caps, lw["rollouts"], lw["response"], list(CONFIGS))


def loss_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every configuration against the baseline on the same batch (they compute the same step): the largest
    relative difference of the gradient norm, and the largest absolute difference of the loss (the on-policy
    loss of equal-length responses is ~0, so only its absolute difference means something)."""
    base = {r["context"]: r for r in rows if r["config"] == "baseline" and r.get("status") == "ok"}
    grad, loss = 0.0, 0.0
    for r in rows:
        b = base.get(r.get("context"))
        if r.get("status") == "ok" and b is not None:
            grad = max(grad, abs(r["grad_norm"] - b["grad_norm"]) / max(b["grad_norm"], 1e-30))
            loss = max(loss, abs(r["loss"] - b["loss"]))
    return {"max_relative_grad_norm_difference_vs_baseline": grad, "max_abs_loss_difference_vs_baseline": loss}


# ----------------------------------------------------------------------------------------------- GPU search


def run_gpu(deadline: Deadline, configs: list[str], caps_gib: list[float], rollouts: int, response: int,
            start_context: int, device: torch.device, shrink: bool = False, max_context: int = 1 << 21,
            attn: str = "flex_attention") -> dict[str, Any]:
    """Largest micro-batch (context) that trains under each memory cap, per configuration (bf16 Qwen3-4B shape).

    Caps are applied with ``torch.cuda.set_per_process_memory_fraction(cap / total)`` (the allocator raises OOM
    beyond it). For each cap and configuration: double the context from ``start_context`` until a step fails, then
    one bisection step between the last success and the first failure (``max_context`` bounds the doubling).
    Configurations are searched in the order given; work past the deadline is recorded as skipped.
    """
    spec = dict(QWEN3_4B)
    dtype = torch.bfloat16
    if shrink:  # testing the plan on a CPU: same code, a model that fits
        spec.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=2048)
        dtype = torch.float32
    model = build_model(spec, device, dtype)
    # flex_attention for every configuration: a BlockMask (no T × T tensor) both for the plain packed group (built by
    # transformers from position_ids) and for the shared prefix (cipo's); sdpa would hold a dense mask on the GPU too
    model.config._attn_implementation = attn
    params = sum(p.numel() for p in model.parameters())
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    out: dict[str, Any] = {"suite": "gpu", "env": environment(device), "model": {
        **spec, "dtype": str(dtype), "parameters": params, "attn_implementation": model.config._attn_implementation},
        "workload": {"rollouts": rollouts, "response": response, "start_context": start_context},
        "caps_gib": caps_gib, "rows": [], "largest": {}}

    def attempt(name: str, context: int, cap: float) -> dict[str, Any]:
        switches = CONFIGS[name]
        configure(model, switches)
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total), device)
        batch = correction_group(context, rollouts, response, spec["vocab_size"], device)
        row = {"config": name, "cap_gib": cap, "context": context, "tokens_plain": batch.num_tokens,
               **measure(model, batch, switches, device, timed_runs=0)}
        pred = memory_model(spec, context=context, rollouts=rollouts, response=response, act_bytes=2,
                            param_count=params, fused=switches["fused"], shared=switches["shared"],
                            tiled=switches["tiled"], ckpt=switches["ckpt"], offload=switches.get("offload", False),
                            **GPU_MODEL_ASSUMPTIONS)
        row["tokens_forward"] = pred["tokens_forward"]
        row["predicted_bytes"] = int(pred["total"])
        del batch
        out["rows"].append(row)
        log(f"[long_context gpu] cap {cap:>4} GiB {name:<18} C={context:<7} N={row['tokens_plain']:<8} "
            f"{row['status']:<6.6}" + (f" {row['peak_extra_bytes'] / 2**30:7.2f} GiB" if row["status"] == "ok" else ""))
        return row

    for cap in caps_gib:
        for name in configs:
            best: Optional[int] = None
            context, failed = start_context, None
            last_s = 0.0
            while context <= max_context and deadline.allows(4 * last_s + 10):
                t0 = time.perf_counter()
                row = attempt(name, context, cap)
                last_s = time.perf_counter() - t0
                if row["status"] != "ok":
                    failed = context
                    break
                best = context
                context *= 2
            if best is not None and failed is not None and failed > best * 1.2 and deadline.allows(4 * last_s + 10):
                middle = (best + failed) // 2
                if attempt(name, middle, cap)["status"] == "ok":
                    best = middle
            if not deadline.allows(10):
                out["rows"].append({"config": name, "cap_gib": cap, "status": "skipped: time budget"})
            out["largest"].setdefault(str(cap), {})[name] = None if best is None else {
                "context": best, "tokens_plain": rollouts * (best + response),
                "tokens_forward": (best + rollouts * response) if CONFIGS[name]["shared"] else
                rollouts * (best + response), "bounded_by_budget": failed is None}
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return out


def predicted_limits(caps_gib: list[float], rollouts: int, response: int, configs: list[str]) -> dict[str, Any]:
    """The memory model's largest context per cap (bf16 Qwen3-4B, weights + gradients, no optimizer state): the
    prediction the GPU search tests."""
    spec = QWEN3_4B
    weights = _param_count(spec) * 2
    out: dict[str, Any] = {}
    for cap in caps_gib:
        row = {}
        for name in configs:
            sw = CONFIGS[name]

            def total(c: int, sw: dict[str, bool] = sw) -> float:
                return weights + memory_model(spec, context=c, rollouts=rollouts, response=response, act_bytes=2,
                                              fused=sw["fused"], shared=sw["shared"], tiled=sw["tiled"],
                                              ckpt=sw["ckpt"], offload=sw.get("offload", False),
                                              **GPU_MODEL_ASSUMPTIONS)["total"]

            if total(1) > cap * 2**30:
                row[name] = None  # not even the responses alone fit
                continue
            lo, hi = 1, 1 << 24
            while hi - lo > 64:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if total(mid) <= cap * 2**30 else (lo, mid)
            plain = rollouts * (lo + response)
            row[name] = {"context": lo, "tokens_plain": plain,
                         "tokens_forward": lo + rollouts * response if sw["shared"] else plain}
        out[f"{cap:g}"] = row
    return out


# ----------------------------------------------------------------------------------------------- main


def _deepspeed_version() -> Optional[str]:
    try:
        import importlib.metadata

        return importlib.metadata.version("deepspeed")
    except Exception:  # noqa: BLE001
        return None


def main(argv: Optional[list[str]] = None) -> None:
    import datetime as _dt
    import shlex
    import sys

    ap = argparse.ArgumentParser(prog="python -m bench.long_context", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="CPU: small model and contexts, no timed repeat")
    ap.add_argument("--configs", default=None, help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--name", default=None, help="file stem (default long_context_<suite>[-quick])")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--caps", default="24,48,80", help="GPU: memory caps in GiB")
    ap.add_argument("--rollouts", type=int, default=8, help="GPU: rollouts per correction group")
    ap.add_argument("--response", type=int, default=1024, help="GPU: response tokens per rollout")
    ap.add_argument("--start-context", type=int, default=4096, help="GPU: first context of the doubling search")
    ap.add_argument("--max-context", type=int, default=1 << 21, help="GPU: largest context the search tries")
    ap.add_argument("--device", default=None, help="GPU suite on another device (testing the plan on a CPU)")
    ap.add_argument("--attn", default=None, help="GPU: attention implementation (default flex_attention on CUDA)")
    ap.add_argument("--redraw", type=Path, default=None,
                    help="recompute the memory model's predictions in a result JSON and rewrite its .md/.png")
    args = ap.parse_args(argv)
    if args.redraw is not None:
        data = json.loads(args.redraw.read_text())
        repredict(data)
        write_json(args.redraw, data)
        for p in write_report(data, args.redraw.parent, args.redraw.stem):
            print(f"wrote {p}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        apply_thread_setting()
    default = CPU_CONFIGS if args.suite == "cpu" else list(CONFIGS)
    configs = [c for c in (args.configs.split(",") if args.configs else default) if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    deadline = Deadline(args.budget_s)
    caps = [float(c) for c in args.caps.split(",") if c]
    if args.suite == "cpu":
        data = run_cpu(args.quick, deadline, configs)
    else:
        device = torch.device(args.device or "cuda")
        data = run_gpu(deadline, configs, caps, args.rollouts, args.response,
                       args.start_context, device, shrink=device.type != "cuda", max_context=args.max_context,
                       attn=args.attn or ("flex_attention" if device.type == "cuda" else "sdpa"))
    data["predicted_limits"] = predicted_limits(caps, args.rollouts, args.response, list(CONFIGS))
    data["limits_workload"] = {"rollouts": args.rollouts, "response": args.response}
    data["deepspeed"] = _deepspeed_version()
    data["command"] = "python -m bench.long_context " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    data["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = args.name or f"long_context_{args.suite}" + ("-quick" if args.quick else "")
    path = args.out / f"{name}.json"
    write_json(path, data)
    written = [path, *write_report(data, args.out, name)]
    print(f"wrote {', '.join(str(p) for p in written)}")


if __name__ == "__main__":
    main()
