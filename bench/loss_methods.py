"""The loss benchmark's methods and their workload: forward+backward of the LM head + policy loss, ours vs what
users would pick instead (run and reported by :mod:`bench.loss_suite`).

Every method gets the same inputs — final hidden states ``[T, H]``, the LM-head weight ``[V, H]``, a packed batch of
equal-length sequences (half base, half correction stream, groups of 4, old/rollout log-probs near the current
policy's) — and produces a scalar loss whose backward fills ``hidden.grad`` and ``weight.grad``.

Methods (``build``):

* ``naive`` — verl's default: logits ``[T, V]`` materialised and upcast to fp32, ``log_softmax``, gather, then
  ``cipo_policy_loss``; autograd backward. It is the fused loss's end-to-end reference,
  ``cipo.fused_loss_ref.materialized_policy_loss`` (the one the tests and the trainer's unfused path use). The
  baseline.
* ``compile`` — ``torch.compile`` of the naive log-prob function (loss eager).
* ``linear_logprob`` — ours, unfused: ``cipo.linear_logprob`` (tiled, 8·THV) then ``cipo_policy_loss``.
* ``fused`` — ours: ``cipo.fused_linear_policy_loss`` with its defaults (automatic tiling; ``dw_accum="auto"``:
  the ``dW`` sum in the weight dtype for half weights on CUDA). ``fused_fp32`` forces ``dw_accum="fp32"``.
* ``fused_token`` / ``fused_vocab`` — the fused loss with its tiling forced; ``fused_token_c<C>`` forces token
  chunks of ``C`` rows and ``fused_token_c<C>_wacc`` adds ``dw_accum="weight"`` (the cross-chunk ``dW`` sum in the
  weight dtype: no fp32 ``V × H`` accumulator) — the GPU tiling study (``--part tiling``) that sets the automatic
  rule.
* ``liger_grpo`` — Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (chunked torch; different semantics, see
  ``SEMANTICS``).
* ``cce`` — Apple's Cut Cross-Entropy ``linear_cross_entropy(reduction="none")`` as the log-prob, then
  ``cipo_policy_loss`` (``impl="torch_compile"`` on CPU, ``impl="cce"`` — Triton, default gradient filtering — on
  CUDA).
* ``liger_flce`` — Liger's Triton ``LigerFusedLinearCrossEntropyLoss(reduction="none")`` as the log-prob, then
  ``cipo_policy_loss`` (CUDA only).
* ``matmul`` — the bare LM-head matmul ``z = h Wᵀ`` forward + backward with a given ``dz`` (no loss at all): the
  FLOP floor 6·THV that the GPU time target is measured against.

The float64 references of the error check: ``naive`` in float64 for our semantics; for Liger, its GRPO formula
re-implemented in float64 (:func:`liger_reference_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from cipo.kernels.linear_logprob_ref import linear_logprob_reference

from cipo.advantages import group_advantages
from cipo.config import PolicyLossConfig
from cipo.fused_loss_ref import MaterializedLoss, materialized_policy_loss
from cipo.loss import cipo_policy_loss
from cipo.packing import PackedBatch, SequenceSample

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
    """verl's default log-prob: logits in the input dtype, upcast to (at least) fp32, log-softmax, gather — the
    kernels' materialised reference, with :func:`naive_loss`'s precision."""
    return linear_logprob_reference(hidden, weight, targets, CONFIG.temperature,
                                    logits_dtype=torch.promote_types(hidden.dtype, torch.float32))


def naive_loss(wl: Workload, hidden: torch.Tensor, weight: torch.Tensor) -> MaterializedLoss:
    """The ``naive`` method: the fused loss's end-to-end reference at verl's default precision (the GEMM in the
    input dtype, the softmax in at least fp32; float64 inputs give the float64 reference of the error check)."""
    return materialized_policy_loss(hidden, weight, wl.batch, CONFIG,
                                    logits_dtype=torch.promote_types(hidden.dtype, torch.float32),
                                    lambda_corr=LAMBDA_CORR, advantages=wl.advantages)


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
        def naive_step() -> dict[str, Optional[torch.Tensor]]:
            ref = naive_loss(wl, h, w)
            ref.loss.backward()
            return {"loss": ref.loss.detach(), "logp": ref.logp.detach()}

        return naive_step
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
