"""Loss section: forward+backward of the LM head + policy loss, ours vs what users would pick instead.

Every method gets the same inputs — final hidden states ``[T, H]``, the LM-head weight ``[V, H]``, a packed batch of
equal-length sequences (half base, half correction stream, groups of 4, old/rollout log-probs near the current
policy's) — and produces a scalar loss whose backward fills ``hidden.grad`` and ``weight.grad``. All methods of one
shape run in one process, one after the other, each timed against the naive baseline measured in the same run.

Methods (``METHODS``):

* ``naive`` — verl's default: logits ``[T, V]`` materialised and upcast to fp32, ``log_softmax``, gather, then
  ``cipo_policy_loss``; autograd backward. The baseline.
* ``compile`` — ``torch.compile`` of the naive log-prob function (loss eager).
* ``linear_logprob`` — ours, unfused: ``cipo.linear_logprob`` (tiled, 8·THV) then ``cipo_policy_loss``.
* ``fused`` — ours: ``cipo.fused_linear_policy_loss`` with its defaults (automatic tiling; ``dw_accum="auto"``:
  the ``dW`` sum in the weight dtype for half weights on CUDA). ``fused_fp32`` forces ``dw_accum="fp32"``.
* ``fused_token`` / ``fused_vocab`` — the fused loss with its tiling forced; ``fused_token_c<C>`` forces token
  chunks of ``C`` rows and ``fused_token_c<C>_wacc`` adds ``dw_accum="weight"`` (the cross-chunk ``dW`` sum in the
  weight dtype: no fp32 ``V × H`` accumulator) — the GPU tiling study (``--part tiling``) that sets the automatic
  rule.
* ``liger_grpo`` — Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (chunked torch; different semantics, see below).
* ``cce`` — Apple's Cut Cross-Entropy ``linear_cross_entropy(reduction="none")`` as the log-prob, then
  ``cipo_policy_loss`` (``impl="torch_compile"`` on CPU, ``impl="cce"`` — Triton, default gradient filtering — on
  CUDA).
* ``liger_flce`` — Liger's Triton ``LigerFusedLinearCrossEntropyLoss(reduction="none")`` as the log-prob, then
  ``cipo_policy_loss`` (CUDA only).
* ``matmul`` — the bare LM-head matmul ``z = h Wᵀ`` forward + backward with a given ``dz`` (no loss at all): the
  FLOP floor 6·THV that issue 3's target is measured against.

Error vs float64: each method's loss, ``dH``, ``dW`` (and per-token logp where it has one) against float64 of the
same semantics (naive torch in float64; for Liger, its GRPO formula re-implemented in float64).
"""

from __future__ import annotations

import argparse
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

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
from cipo.advantages import group_advantages  # noqa: E402
from cipo.config import PolicyLossConfig  # noqa: E402
from cipo.loss import cipo_policy_loss  # noqa: E402
from cipo.packing import PackedBatch, SequenceSample  # noqa: E402

LAMBDA_CORR = 0.5
CONFIG = PolicyLossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, tis_mode="token", tis_cap=2.0,
                          loss_agg_mode="token-mean", temperature=1.0)
CONFIG_TEXT = ("CIPO loss L_base + 0.5·L_corr, token-mean per stream, clip 0.2/0.28, dual-clip 3, token TIS cap 2, "
               "no KL, entropy coef 0, temperature 1")

# What each method computes, when it is not exactly our loss (shown in the tables).
SEMANTICS = {
    "matmul": "no loss: z = h·Wᵀ fwd + bwd with a given dz (the FLOP floor, 6·THV)",
    "naive": "ours (reference semantics)",
    "compile": "ours",
    "linear_logprob": "ours",
    "fused": "ours",
    "fused_token": "ours",
    "fused_vocab": "ours",
    "fused_fp32": "ours (dW summed over chunks in fp32: the default's exact-sum alternative)",
    "liger_grpo": ("differs: one stream (no λ·L_corr), bnpo token-mean over all tokens, no dual-clip; TIS via "
                   "vllm_is_ratio; [B, L] padded layout (equal lengths here, so no padding); compiled=True on "
                   "CUDA (its default), False on CPU"),
    "cce": "ours, with CCE's per-token cross-entropy as −logp (no entropy)",
    "liger_flce": "ours, with Liger's per-token fused linear cross-entropy as −logp (no entropy)",
}
LABELS = {
    "matmul": "LM-head matmul only",
    "naive": "naive torch (fp32 logits)",
    "compile": "torch.compile(naive)",
    "linear_logprob": "cipo linear_logprob + loss",
    "fused": "cipo fused_linear_policy_loss",
    "fused_token": "cipo fused, token chunks",
    "fused_vocab": "cipo fused, vocab slabs",
    "fused_fp32": "cipo fused, dw_accum=\"fp32\"",
    "liger_grpo": "Liger LigerFusedLinearGRPOLoss",
    "cce": "Cut Cross-Entropy + loss",
    "liger_flce": "Liger FLCE (reduction=none) + loss",
}
# Methods that hold the full [T, V] logits (the naive memory model applies).
MATERIALISING = {"naive", "compile", "matmul"}


def _token_variant(method: str) -> Optional[tuple[int, str]]:
    """``(chunk_tokens, dw_accum)`` of a ``fused_token_c<C>[_wacc]`` method name, else None (``_wacc``:
    ``dw_accum="weight"``)."""
    if not method.startswith("fused_token_c"):
        return None
    parts = method[len("fused_token_c"):].split("_")
    return int(parts[0]), ("weight" if "wacc" in parts else "fp32")


def label(method: str) -> str:
    variant = _token_variant(method)
    if variant is None:
        return LABELS[method]
    chunk, acc = variant
    return f"cipo fused, token chunks of {chunk}, dW sum in {'the weight dtype' if acc == 'weight' else 'fp32'}"


def semantics(method: str) -> str:
    variant = _token_variant(method)
    if variant is None:
        return SEMANTICS[method]
    return "ours (dW summed over chunks in the weight dtype)" if variant[1] == "weight" else "ours"


# ----------------------------------------------------------------------------------------------- workload


@dataclass
class Shape:
    tokens: int
    hidden: int
    vocab: int
    dtype: str = "float32"
    seq_len: int = 256
    methods: tuple[str, ...] = ()
    repeats: int = 3
    warmup: bool = True
    tag: str = ""  # e.g. "cpu-target", "issue-3"
    profile: tuple[str, ...] = ()  # methods whose device time per kernel is recorded (CUDA, one extra call)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def describe(self) -> str:
        return f"T={self.tokens} H={self.hidden} V={self.vocab} {self.dtype}"


@dataclass
class Workload:
    shape: Shape
    device: torch.device
    hidden: torch.Tensor
    weight: torch.Tensor
    batch: PackedBatch
    advantages: torch.Tensor  # [S]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def reset(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


def make_workload(shape: Shape, device: torch.device, seed: int = 0) -> Workload:
    """Equal-length sequences (prompt of 1 token: every method does the same FLOPs), groups of 4, streams
    alternating by group; old log-probs = current ± 5 %, rollout log-probs = old ± 5 % (ratios near 1, as in
    practice). Hidden ~ N(0, 1), weight ~ N(0, 3/√H): logits of std 3, entropy ~6 nats."""
    T, H, V, L = shape.tokens, shape.hidden, shape.vocab, shape.seq_len
    if T % L:
        raise ValueError(f"tokens {T} must be a multiple of seq_len {L}")
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(T // L):
        group = i // 4
        seqs.append(SequenceSample(
            torch.randint(0, V, (1,), generator=gen), torch.randint(0, V, (L - 1,), generator=gen),
            reward=_reward(i, gen), group_id=group, stream=group % 2,
        ))  # fmt: skip
    batch = PackedBatch.from_sequences(seqs)
    dtype = shape.torch_dtype
    hidden = torch.randn(T, H, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(V, H, generator=gen) * (3.0 / H**0.5)).to(device=device, dtype=dtype)
    batch = batch.to(device)
    logp = _chunked_logp(hidden, weight, batch.targets)
    m = batch.loss_mask
    noise = torch.randn(2, T, generator=gen).to(device)
    old = torch.where(m, logp + 0.05 * noise[0], 0.0)
    batch.old_logp = old
    batch.rollout_logp = torch.where(m, old + 0.05 * noise[1], 0.0)
    adv = group_advantages(batch.reward, batch.group_id)
    return Workload(shape, device, hidden.requires_grad_(True), weight.requires_grad_(True), batch, adv)


def _reward(i: int, gen: torch.Generator) -> float:
    """Random 0/1 rewards, except that the first two sequences of each group of 4 get 1 and 0: no group has equal
    rewards, so every sequence has a non-zero advantage (the loss and its gradient are never trivially 0)."""
    if i % 4 < 2:
        return float(i % 4 == 0)
    return float(torch.rand((), generator=gen) < 0.5)


@torch.no_grad()
def _chunked_logp(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Plain-torch fp32 logp in row chunks of ≤ 256 MiB of logits (independent of the kernels under test)."""
    rows = max(1, (256 * 2**20) // (4 * weight.shape[0]))
    out = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    for i in range(0, hidden.shape[0], rows):
        out[i:i + rows] = naive_logp(hidden[i:i + rows], weight, targets[i:i + rows]).float()
    return out


# ----------------------------------------------------------------------------------------------- methods


def naive_logp(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """verl's default path: logits in the input dtype, upcast to (at least) fp32, log-softmax, gather — the kernels'
    materialised reference."""
    return linear_logprob_reference(hidden, weight, targets, CONFIG.temperature,
                                    logits_dtype=torch.promote_types(hidden.dtype, torch.float32))


_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def _compiled_naive() -> Callable[..., torch.Tensor]:
    if "naive" not in _COMPILED:
        _COMPILED["naive"] = torch.compile(naive_logp)
    return _COMPILED["naive"]


def _loss_from_logp(wl: Workload, logp: torch.Tensor) -> torch.Tensor:
    loss, _ = cipo_policy_loss(logp, wl.batch, CONFIG, lambda_corr=LAMBDA_CORR, advantages=wl.advantages)
    return loss


StepFn = Callable[[], dict[str, Optional[torch.Tensor]]]


def build(method: str, wl: Workload) -> StepFn:
    """A closure running one forward + backward of ``method``; it returns the loss (and logp when it has one)."""
    h, w, b = wl.hidden, wl.weight, wl.batch

    def via_logp(logp_fn: Callable[[], torch.Tensor]) -> StepFn:
        def step() -> dict[str, Optional[torch.Tensor]]:
            logp = logp_fn()
            loss = _loss_from_logp(wl, logp)
            loss.backward()
            return {"loss": loss.detach(), "logp": logp.detach()}

        return step

    if method == "naive":
        return via_logp(lambda: naive_logp(h, w, b.targets))
    if method == "compile":
        fn = _compiled_naive()
        return via_logp(lambda: fn(h, w, b.targets))
    if method == "linear_logprob":
        from cipo import linear_logprob

        return via_logp(lambda: linear_logprob(h, w, b.targets, CONFIG.temperature))
    if method in ("fused", "fused_token", "fused_vocab", "fused_fp32") or _token_variant(method) is not None:
        from cipo import fused_linear_policy_loss

        variant = _token_variant(method)
        tiling = {"fused": None, "fused_token": "token", "fused_vocab": "vocab"}.get(method, "token")
        chunk_tokens, dw_accum = variant if variant is not None else (
            None, "fp32" if method == "fused_fp32" else "auto")

        def fused_step() -> dict[str, Optional[torch.Tensor]]:
            loss, _ = fused_linear_policy_loss(h, w, b, CONFIG, lambda_corr=LAMBDA_CORR, advantages=wl.advantages,
                                               tiling=tiling, chunk_tokens=chunk_tokens, dw_accum=dw_accum)
            loss.backward()
            return {"loss": loss.detach(), "logp": None}

        return fused_step
    if method == "cce":
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if wl.device.type == "cuda" else "torch_compile"
        return via_logp(lambda: -linear_cross_entropy(h, w, b.targets, impl=impl, reduction="none").float())
    if method == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss(reduction="none")
        return via_logp(lambda: -flce(w, h, b.targets).float())
    if method == "liger_grpo":
        return _liger_grpo_step(wl)
    if method == "matmul":
        if "dz" not in wl.extra:
            wl.extra["dz"] = torch.randn(h.shape[0], w.shape[0], device=wl.device, dtype=h.dtype)
        dz = wl.extra["dz"]

        def matmul_step() -> dict[str, Optional[torch.Tensor]]:
            z = h @ w.t()
            z.backward(dz)
            return {"loss": None, "logp": None}

        return matmul_step
    raise ValueError(f"unknown method {method!r}")


def _liger_inputs(wl: Workload) -> dict[str, Any]:
    b, L = wl.batch, wl.shape.seq_len
    B = b.num_seqs
    m = b.loss_mask.view(B, L)
    is_ratio = torch.clamp(torch.exp(b.old_logp - b.rollout_logp), max=CONFIG.tis_cap)
    return {"B": B, "L": L, "targets": b.targets.clamp(min=0).view(B, L), "mask": m.to(torch.float32),
            "old": b.old_logp.view(B, L), "is_ratio": torch.where(m, is_ratio.view(B, L), 0.0),
            "adv": wl.advantages.float()}


def _liger_grpo_step(wl: Workload) -> StepFn:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    li = _liger_inputs(wl)
    # compiled=True is Liger's default; on CPU it compiles only the small loss math, at a C++ compile per shape.
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, compiled=wl.device.type == "cuda",
                                       epsilon_low=CONFIG.clip_ratio_low, epsilon_high=CONFIG.clip_ratio_high,
                                       loss_type="bnpo", temperature=CONFIG.temperature)
    h, w = wl.hidden, wl.weight

    def step() -> dict[str, Optional[torch.Tensor]]:
        loss, _ = loss_fn(h.view(li["B"], li["L"], -1), w, li["targets"], li["mask"], li["adv"],
                          old_per_token_logps=li["old"], vllm_is_ratio=li["is_ratio"])
        loss.backward()
        return {"loss": loss.detach(), "logp": None}

    return step


def liger_reference_loss(wl: Workload, logp: torch.Tensor) -> torch.Tensor:
    """Liger's GRPO formula (bnpo aggregation) from a given per-token logp, in logp's dtype."""
    li = _liger_inputs(wl)
    dt = logp.dtype
    lp = logp.view(li["B"], li["L"])
    coef1 = torch.exp(lp - li["old"].to(dt))
    coef2 = torch.clamp(coef1, 1 - CONFIG.clip_ratio_low, 1 + CONFIG.clip_ratio_high)
    adv = li["adv"].to(dt)[:, None]
    per_token = -torch.minimum(coef1 * adv, coef2 * adv) * li["is_ratio"].to(dt)
    mask = li["mask"].to(dt)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def unavailable(method: str, device: torch.device) -> Optional[str]:
    """Why ``method`` cannot run here (None when it can)."""
    if method in ("cce",):
        try:
            import cut_cross_entropy  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"skipped: cut-cross-entropy not importable ({type(exc).__name__}: {exc})"
    if method in ("liger_grpo", "liger_flce"):
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"skipped: liger-kernel not importable ({type(exc).__name__}: {exc})"
    if method == "liger_flce" and device.type != "cuda":
        return "n/a on CPU: Liger's fused linear cross-entropy is a Triton kernel (CUDA only)"
    return None


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
        logp64 = naive_logp(h64, w64, wl.batch.targets)
        loss64 = _loss_from_logp(wl, logp64) if sem == "cipo" else liger_reference_loss(wl, logp64)
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
    """The two kernels without an LM head, each timed as the product calls it and next to its torch reference:
    ``policy_loss`` (the CIPO loss from per-token log-probs, forward + backward; Triton on CUDA, the torch reference
    on CPU, so the two rows are the same path there) and ``group_advantage`` (GRPO advantages of the step's
    rewards)."""
    from cipo.kernels.group_advantage_ref import group_advantages_reference

    from cipo.advantages import dense_group_index
    from cipo.loss import StreamPart, flatten_inputs, loss_reference
    from cipo.packing import BASE_STREAM, CORRECTION_STREAM

    tokens, seqs = (8192, 1024) if quick else (65536, 8192)
    wl = make_workload(Shape(tokens, 16, 64, seq_len=tokens // seqs * 1), device, seed=2)
    logp = wl.batch.old_logp.clone().requires_grad_(True)

    def loss_step() -> None:
        logp.grad = None
        loss, _ = cipo_policy_loss(logp, wl.batch, CONFIG, lambda_corr=LAMBDA_CORR, advantages=wl.advantages)
        loss.backward()

    def loss_reference_step() -> None:  # the same call, its torch path forced (what CPU tensors take anyway)
        logp.grad = None
        b = wl.batch
        flat = flatten_inputs(logp, b.old_logp, wl.advantages, b.loss_mask, rollout_logp=b.rollout_logp,
                              cu_seqlens=b.cu_seqlens)
        stream = b.stream[flat.seq_index]
        parts = [StreamPart("base", flat.mask & (stream == BASE_STREAM), 1.0),
                 StreamPart("corr", flat.mask & (stream == CORRECTION_STREAM), LAMBDA_CORR)]
        loss, _ = loss_reference(flat, CONFIG, parts, flat.default_scale)
        loss.backward()

    rewards = wl.batch.reward
    group_index, num_groups = dense_group_index(wl.batch.group_id)
    calls = {
        "policy_loss": (f"cipo_policy_loss fwd+bwd from logp, T={tokens}", loss_step),
        "policy_loss_ref": (f"its torch reference path (cipo.loss.loss_reference), T={tokens}", loss_reference_step),
        "group_advantage": (f"group_advantages, S={seqs} in groups of 4",
                            lambda: group_advantages(rewards, wl.batch.group_id)),
        "group_advantage_ref": (f"group_advantages_reference (torch), S={seqs}",
                                lambda: group_advantages_reference(rewards, group_index, num_groups, "grpo", 1e-6)),
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
            # issue's shapes: the numbers behind the automatic rule (_choose_tiling in
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
    ap.add_argument("--part", default="targets", choices=("targets", "tiling", "sweep"))
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
