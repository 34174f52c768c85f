"""Tests of ``cipo.kernels.fused_linear_policy_loss``: Triton (interpreter) and torch epilogues, both tilings,
against a float64 reference.

Run: ``python -m pytest tests/kernels/test_fused_linear_policy_loss.py`` (the conftests set ``TRITON_INTERPRET=1``
when there is no GPU; the Triton cases set ``CIPO_FORCE_TRITON=1`` through ``monkeypatch``).

Reference: ``cipo.fused_loss_ref.materialized_policy_loss`` in float64 on the same (for half inputs: the
half-rounded) values — full logits → ``log_softmax`` → gather → ``cipo_policy_loss(..., entropy=...)`` (torch path)
→ autograd w.r.t. ``hidden`` and ``weight``. On-policy (``old_logp`` None) it uses its own float64 ``logp``
detached.

Inputs put ratios only at fixed distances from every clip boundary (ratio ∈ {0.5, 0.7, 0.9, 1.1, 1.5, 4}·e^{±0.01},
clip range [0.8, 1.28], dual clip 3): fp32 and float64 then take the same branch everywhere, so decisions
(``clipfrac*``, ``tis_clipfrac``) must agree exactly; on-policy (ratio exactly 1, both sides tied) is exact too.

Tolerances. ``S`` = max |logit / temperature|; ``ε = 5e-6·max(1, S)`` is the fp32 logp/entropy tolerance of
``linear_logprob`` (its tests). ``M`` = ``Σ_p max(1, λ_p)·agg_p(|pg| + |kl| + |H|)`` in float64 — the scale that
rounding errors of the sums are relative to, even when signed terms cancel. ``G`` = ``Σ_t |∂L/∂logp_t| +
|∂L/∂H_t|`` of the reference (first-order propagation of per-token logp/entropy errors into the loss).
* fp32: loss and loss-like metrics ``|Δ| ≤ 1e-5·M + 2ε·G``; ``approx_kl`` ``|Δ| ≤ 1e-5·2 + 2ε`` (|log-ratio|
  ≤ log 4 < 2 by construction); counts exact (1e-12); gradients elementwise ``|Δ| ≤ 2e-5·|g| + 2e-5·max|g|``
  (the ``linear_logprob`` rule). Worst observed over all configurations, both paths, both tilings: 0.05 of the
  tolerance.
* extreme logits (S ≈ 1.25e4, fp32): the same loss formula — ``ε`` then dominates (fp32 logits of size 1e4 carry
  ~1e-3 absolute rounding, i.e. that much relative error in every ``p_j``); gradients elementwise with
  ``4·2⁻²⁴·S`` (3e-3) in place of ``2e-5`` (the ``linear_logprob`` rule for extreme logits; observed 0.16 of it),
  and nothing NaN/inf.
* bf16 inputs (u = 2⁻⁸; CPU tiles are bf16, as in torch's own bf16 path): every scaled logit carries ``|δs| ≤ u·S``,
  so ``|δ logp| ≤ 2u·S`` and ``|δ H| ≤ 2u·S·(2H + 1)``; the test requires the loss error
  ``≤ 2u·S·(2·max H + 1)·G + 1e-5·M`` (loose: observed 1e-3 of it) and, the practical yardstick, every error
  (loss, dH, dW by relative Frobenius norm) ≤ 1.25× that of torch's bf16 path (bf16 GEMM → fp32 log-softmax → the
  same loss) on the same inputs (observed 1.00-1.08×). With fp32 tiles for bf16 inputs (the CUDA layout, simulated
  on CPU) the errors must be ≤ 1.0× torch's (observed 0.45-0.7× for the gradients, ~1e-3× for the loss).
* ``dw_accum="weight"`` (bf16 cross-chunk sum): dW relative error ≤ that of the fp32 accumulation + 4 chunks·2⁻⁹.
* against ``cipo_policy_loss(linear_logprob(...))`` in fp32 (same fp32 formulas, different GEMM shapes):
  loss ``1e-5·M``, metrics ``1e-5·M``, gradients ``1e-5·|g| + 1e-5·max|g|``.
* float64 torch path against central differences (ε = 1e-6) along 4 random directions: ``1e-7 + 1e-6·|d|``.
* memory (CPU path, T=8192, V=32000, H=256): peak extra ≤ 2 tiles + gradients + fp32 dW accumulator + 2·T·H·4 +
  16 MiB = 230 MiB (observed 164 MiB; the logits alone are 1000 MiB, the naive path peaks at 4000 MiB).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from cipo.kernels import _fused_epilogue
from cipo.kernels import fused_linear_policy_loss as flpl
from cipo.kernels._chunking import chunk_bounds, plan_chunks
from cipo.kernels.linear_logprob import linear_logprob
from cipo.kernels.linear_logprob_ref import linear_logprob_reference
from cipo.kernels.policy_loss_torch import aggregate, token_terms

from bench.profiling import cpu_peak_alloc_bytes
from cipo import PackedBatch, PolicyLossConfig, SequenceSample, cipo_policy_loss, fused_linear_policy_loss
from cipo.fused_loss import fused_loss_inputs
from cipo.fused_loss_ref import materialized_policy_loss
from cipo.loss import flatten_inputs

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"
TOL_SUM = 1e-5
GRAD_TOL = 2e-5
COUNT_METRICS = ("clipfrac", "clipfrac_lower", "tis_clipfrac", "tokens/base", "tokens/corr")
BF16_U = 2.0**-8

# (prompt_len, response_len, stream, group_id): two base groups, two correction groups, ragged lengths.
SPEC = [
    (3, 6, 0, 0), (2, 5, 0, 0), (4, 7, 0, 0),
    (2, 4, 0, 1), (3, 6, 0, 1),
    (2, 5, 1, 10), (3, 3, 1, 10), (1, 6, 1, 10),
    (2, 4, 1, 11), (4, 5, 1, 11),
]  # fmt: skip
REWARDS = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
RATIOS = torch.tensor([0.5, 0.7, 0.9, 1.1, 1.5, 4.0], dtype=torch.float64)
FULL = dict(clip_ratio_high=0.28, kl_coef=0.1, kl_type="low_var_kl", entropy_coef=0.01, tis_mode="token", tis_cap=2.0,
            temperature=0.7)  # fmt: skip


@pytest.fixture(autouse=True)
def _interpreter_active():
    if DEVICE == "cpu" and type(_fused_epilogue._fused_epilogue_kernel).__name__ != "InterpretedFunction":
        pytest.skip("the kernels were imported before TRITON_INTERPRET=1 was set; run the kernel tests in their "
                    "own pytest process or set TRITON_INTERPRET=1 in the environment")


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def token_rows(batch: PackedBatch, config: PolicyLossConfig) -> "_fused_epilogue.TokenRows":
    """The fused loss's per-row inputs of ``batch`` (fp32, CPU, all rows), as the public entry prepares them."""
    inputs = fused_loss_inputs(batch, config, 1.0, None, "grpo", None, None, torch.float32, torch.device("cpu"))
    return flpl.token_rows(**inputs, dtype=torch.float32)


@dataclass
class Case:
    batch: PackedBatch
    hidden: torch.Tensor  # [T, H], the input dtype
    weight: torch.Tensor  # [V, H]
    temperature: float


def _logp_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token logp and entropy from full logits, in the inputs' dtype (autograd-friendly)."""
    return linear_logprob_reference(hidden, weight, targets, temperature, return_entropy=True)


def make_case(spec=SPEC, V: int = 1009, H: int = 37, *, seed: int = 0, temperature: float = 0.7, scale: float = 1.0,
              dtype: torch.dtype = torch.float32, rewards=None) -> Case:
    """A packed batch with old/ref/rollout log-probs placed relative to the true (float64) logp."""
    gen = torch.Generator().manual_seed(seed)
    rewards = REWARDS if rewards is None else rewards
    seqs = []
    for (plen, rlen, stream, group), reward in zip(spec, rewards):
        seqs.append(SequenceSample(torch.randint(0, V, (plen,), generator=gen), torch.randint(0, V, (rlen,),
                                   generator=gen), reward=reward, group_id=group, stream=stream,
                                   old_logp=[0.0] * rlen, ref_logp=[0.0] * rlen, rollout_logp=[0.0] * rlen))
    batch = PackedBatch.from_sequences(seqs)
    T = batch.num_tokens
    hidden = (torch.randn(T, H, generator=gen) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=gen) * (2.0 / math.sqrt(H))).to(dtype)
    logp64, _ = _logp_entropy(hidden.double(), weight.double(), batch.targets, temperature)
    m = batch.loss_mask
    ratio = RATIOS[torch.randint(0, len(RATIOS), (T,), generator=gen)]
    ratio = ratio * torch.exp(0.02 * torch.rand(T, generator=gen, dtype=torch.float64) - 0.01)
    old = logp64 - torch.log(ratio)
    batch.old_logp = torch.where(m, old, 0.0).float()
    batch.ref_logp = torch.where(m, logp64 + 0.3 * torch.randn(T, generator=gen, dtype=torch.float64), 0.0).float()
    log_w = 1.7 * torch.rand(T, generator=gen, dtype=torch.float64) - 0.5  # token TIS cap log 2 ≈ 0.69 binds
    batch.rollout_logp = torch.where(m, batch.old_logp.double() - log_w, 0.0).float()
    return Case(batch, hidden, weight, temperature)


@dataclass
class Result:
    loss: float
    metrics: dict[str, float]
    d_hidden: torch.Tensor  # float64, CPU
    d_weight: torch.Tensor
    scale: float = 0.0  # M (reference only)
    gain: float = 0.0  # G (reference only)


def reference(case: Case, config: PolicyLossConfig, **kwargs) -> Result:
    h = case.hidden.double().requires_grad_(True)
    w = case.weight.double().requires_grad_(True)
    ref = materialized_policy_loss(h, w, case.batch, config, with_entropy=True, **kwargs)
    loss, metrics, logp, ent = ref.loss, ref.metrics, ref.logp, ref.entropy
    logp.retain_grad()
    ent.retain_grad()
    loss.backward()
    batch = case.batch
    if batch.old_logp is None:  # on-policy: M is measured against the old_logp the reference used
        batch = copy.copy(batch)
        batch.old_logp = logp.detach()
    gain = sum(float(t.grad.abs().sum()) for t in (logp, ent) if t.grad is not None)
    return Result(float(loss.detach()), metrics, h.grad, w.grad, _magnitude(logp.detach(), ent.detach(), batch, config,
                                                                   **kwargs), gain)


def _magnitude(logp, ent, batch, config, lambda_corr=1.0, advantages=None, base_normalizer=None,
               corr_normalizer=None, **_) -> float:
    """M = Σ_p max(1, λ_p)·agg_p(|pg| + |kl| + |H|) in float64."""
    from cipo.advantages import group_advantages

    adv = advantages if advantages is not None else group_advantages(batch.reward.double(), batch.group_id)
    flat = flatten_inputs(logp, batch.old_logp.double(), adv.double(), batch.loss_mask,
                          ref_logp=batch.ref_logp.double() if batch.ref_logp is not None else None,
                          rollout_logp=batch.rollout_logp.double() if batch.rollout_logp is not None else None,
                          entropy=ent, cu_seqlens=batch.cu_seqlens)
    terms = token_terms(flat.logp, flat.old_logp, flat.advantages, flat.mask, flat.seq_index, flat.num_seqs,
                        clip_ratio_low=config.clip_ratio_low, clip_ratio_high=config.clip_ratio_high,
                        clip_ratio_c=config.clip_ratio_c,
                        kl_estimator=config.kl_estimator if flat.ref_logp is not None else None,
                        tis_mode=config.tis_mode, tis_cap=config.tis_cap, ref_logp=flat.ref_logp,
                        rollout_logp=flat.rollout_logp, entropy=flat.entropy)
    absolute = terms.pg.abs() + terms.entropy.abs() + (terms.kl.abs() if terms.kl is not None else 0.0)
    scale = config.loss_scale_factor if config.loss_scale_factor is not None else flat.default_scale
    stream = batch.stream[flat.seq_index]
    total = 0.0
    for s, weight, norm in ((0, 1.0, base_normalizer), (1, lambda_corr, corr_normalizer)):
        part = flat.mask & (stream == s)
        total += max(1.0, weight) * float(aggregate(absolute, part, flat.seq_index, flat.num_seqs,
                                                    config.loss_agg_mode, scale_factor=scale, normalizer=norm))
    return total


def run_fused(case: Case, config: PolicyLossConfig, device: str = "cpu", **kwargs) -> Result:
    h = case.hidden.to(device, copy=True).requires_grad_(True)
    w = case.weight.to(device, copy=True).requires_grad_(True)
    loss, metrics = fused_linear_policy_loss(h, w, case.batch.to(device), config, **kwargs)
    want = torch.float64 if case.hidden.dtype == torch.float64 else torch.float32
    assert loss.dim() == 0 and loss.dtype == want
    loss.backward()
    assert h.grad.dtype == case.hidden.dtype and w.grad.dtype == case.weight.dtype
    return Result(float(loss.detach()), metrics, h.grad.double().cpu(), w.grad.double().cpu())


def _logit_scale(case: Case) -> float:
    return float((case.hidden.double() @ case.weight.double().t()).abs().max()) / case.temperature


def assert_matches(got: Result, want: Result, eps: float, grad_tol: float = GRAD_TOL, what: str = "") -> None:
    assert list(got.metrics) == list(want.metrics), f"{what}: metric keys/order differ"
    tol = TOL_SUM * want.scale + 2 * eps * want.gain + 1e-12
    assert abs(got.loss - want.loss) <= tol, f"{what}: loss {got.loss} vs {want.loss} (tol {tol:.3g})"
    for key, value in want.metrics.items():
        if key in COUNT_METRICS:
            assert got.metrics[key] == pytest.approx(value, abs=1e-12), f"{what}: {key}"
        elif key == "approx_kl":
            assert abs(got.metrics[key] - value) <= TOL_SUM * 2.0 + 2 * eps, f"{what}: {key}"
        else:
            assert abs(got.metrics[key] - value) <= tol, f"{what}: {key} {got.metrics[key]} vs {value}"
    for name, g, r in (("dH", got.d_hidden, want.d_hidden), ("dW", got.d_weight, want.d_weight)):
        assert torch.isfinite(g).all(), f"{what}: {name} not finite"
        torch.testing.assert_close(g, r, rtol=grad_tol, atol=grad_tol * float(r.abs().max()) + 1e-30,
                                   msg=lambda m, n=name: f"{what}: {n}: {m}")


@dataclass
class Impl:
    name: str
    device: str
    launches: list


def _use_triton(monkeypatch) -> Impl:
    """The Triton path (CUDA tensors take it; CPU tensors when forced, under the interpreter) and a count of the
    fused kernel's launches (proof that it ran). Forcing only on the interpreter: on a GPU the float64 reference
    runs on CPU tensors, which must take the torch path."""
    launches: list = []
    monkeypatch.setenv("CIPO_FORCE_TRITON", "1" if DEVICE == "cpu" else "0")
    real = flpl.launch

    def spy(*args, **kwargs):
        launches.append(args[2])  # the phase
        return real(*args, **kwargs)

    monkeypatch.setattr(flpl, "launch", spy)
    return Impl("triton", DEVICE, launches)


@pytest.fixture(params=["torch", "triton"])
def impl(request, monkeypatch) -> Impl:
    """The epilogue implementation: chunked torch (the CPU path) or Triton."""
    if request.param == "triton":
        return _use_triton(monkeypatch)
    monkeypatch.setenv("CIPO_FORCE_TRITON", "0")
    return Impl("torch", "cpu", [])


def _check_ran(impl: Impl) -> None:
    if impl.name == "triton":
        assert impl.launches, "the Triton epilogue never ran"
        impl.launches.clear()


def _compare(impl: Impl, case: Case, config: PolicyLossConfig, tilings=("token", "vocab"), chunk: Optional[int] = None,
             **kwargs) -> Result:
    want = reference(case, config, **kwargs)
    eps = 5e-6 * max(1.0, _logit_scale(case))
    for tiling in tilings:
        got = run_fused(case, config, impl.device, tiling=tiling, chunk_tokens=chunk, **kwargs)
        assert_matches(got, want, eps, what=f"{impl.name}/{tiling}")
        _check_ran(impl)
    return want


# ---------------------------------------------------------------------------------------------------------------
# accuracy vs float64: loss configurations
# ---------------------------------------------------------------------------------------------------------------

CONFIGS = {
    "full/token-mean": (dict(FULL), dict(lambda_corr=0.5)),
    "full/token-sum": (dict(FULL, loss_agg_mode="token-sum"), dict(lambda_corr=0.5)),
    "full/seq-mean-token-sum": (dict(FULL, loss_agg_mode="seq-mean-token-sum"), dict(lambda_corr=1.5)),
    "full/seq-mean-token-mean": (dict(FULL, loss_agg_mode="seq-mean-token-mean"), dict(lambda_corr=0.5)),
    "full/seq-mean-token-sum-norm": (dict(FULL, loss_agg_mode="seq-mean-token-sum-norm"), dict(lambda_corr=0.5)),
    "sum-norm/scale-factor": (dict(FULL, loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=64.0), {}),
    "no-dual-clip": (dict(FULL, clip_ratio_c=None), dict(lambda_corr=2.0)),
    "kl/k1": (dict(kl_coef=0.2, kl_type="k1"), {}),
    "kl/k2": (dict(kl_coef=0.2, kl_type="k2", temperature=1.3), {}),
    "kl/abs": (dict(kl_coef=0.2, kl_type="abs"), {}),
    "kl/metric-only": (dict(kl_coef=0.0, kl_type="k3"), {}),
    "tis/sequence": (dict(FULL, tis_mode="sequence", tis_cap=3.0), dict(lambda_corr=0.5)),
    "grpo-plain": (dict(), {}),
    "normalizers/token-mean": (dict(FULL), dict(lambda_corr=2.0, base_normalizer=80.0, corr_normalizer=31.0)),
    "normalizers/seq-mean": (dict(FULL, loss_agg_mode="seq-mean-token-mean"), dict(base_normalizer=9.0,
                                                                                  corr_normalizer=7.0)),
    "advantages-given": (dict(FULL, entropy_coef=0.0), dict(advantages=torch.linspace(-1.5, 2.0, len(SPEC)))),
    # last: each case's data seed is its index
    "kl/low_var_kl+": (dict(kl_coef=0.2, kl_type="low_var_kl+"), {}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_float64(impl, name):
    cfg_kwargs, call_kwargs = CONFIGS[name]
    config = PolicyLossConfig(**cfg_kwargs)
    case = make_case(seed=list(CONFIGS).index(name), temperature=config.temperature)
    # torch: several chunks / slabs; Triton (one launch per chunk under the interpreter): one tile.
    want = _compare(impl, case, config, chunk=16 if impl.name == "torch" else None, **call_kwargs)
    if name.startswith("full/") or name == "tis/sequence":  # the data must exercise every branch
        for key in ("clipfrac", "clipfrac_lower", "tis_clipfrac"):
            assert 0.0 < want.metrics[key] < 1.0, key


def test_triton_chunked_and_kernel_phases(monkeypatch):
    """Triton with several token chunks and vocab slabs (per-chunk views of every per-token buffer)."""
    impl = _use_triton(monkeypatch)
    config = PolicyLossConfig(**FULL)
    case = make_case(seed=21)
    _compare(impl, case, config, chunk=19, lambda_corr=0.5)


@pytest.mark.parametrize("tis_mode", [None, "token", "sequence"])
def test_on_policy(impl, tis_mode):
    """old_logp None: ratio exactly 1 (no clipping, approx_kl 0); TIS weights from the current log-probs.
    Sequence TIS needs whole sequences per chunk (token tiling) or the statistics pass first (vocab tiling)."""
    case = make_case(seed=30)
    case.batch.old_logp = None
    b, m = case.batch, case.batch.loss_mask
    logp64, _ = _logp_entropy(case.hidden.double(), case.weight.double(), b.targets, case.temperature)
    perm = torch.randperm(b.num_tokens, generator=torch.Generator().manual_seed(30))  # not the global RNG
    log_w = torch.linspace(-0.4, 0.6, b.num_tokens, dtype=torch.float64)[perm]
    b.rollout_logp = torch.where(m, logp64 - log_w, 0.0).float()
    cap = 1.2
    if tis_mode == "sequence":
        # The cap in the widest gap between two sequences' log-weights: it binds for some sequences and not for
        # others, and fp32 rounding of the sums (~1e-6) cannot move a sequence across it.
        sums = torch.zeros(b.num_seqs, dtype=torch.float64).index_add_(0, b.seq_index(), torch.where(m, log_w, 0.0))
        vals = sums.sort().values
        gap = int((vals[1:] - vals[:-1]).argmax())
        assert vals[gap + 1] - vals[gap] > 1e-3
        cap = float(torch.exp((vals[gap] + vals[gap + 1]) / 2))
    config = PolicyLossConfig(**dict(FULL, tis_mode=tis_mode, tis_cap=cap))
    # chunk 9 < the longest sequence (7 loss rows) + a neighbour: chunks are cut on sequence boundaries
    want = _compare(impl, case, config, chunk=9, lambda_corr=0.5)
    assert want.metrics["clipfrac"] == 0 and want.metrics["approx_kl"] == 0
    if tis_mode is not None:
        assert 0.0 < want.metrics["tis_clipfrac"] < 1.0


def test_on_policy_sequence_tis_chunks_on_boundaries(monkeypatch):
    """The chunk bounds of on-policy sequence TIS follow sequences, and the automatic choice takes vocab slabs
    when a sequence is longer than a chunk."""
    monkeypatch.setenv("CIPO_FORCE_TRITON", "0")
    case = make_case(seed=31)
    case.batch.old_logp = None
    config = PolicyLossConfig(tis_mode="sequence")
    k, _ = flpl.compact_rows(token_rows(case.batch, config))
    assert k.deferred
    bounds = chunk_bounds(k.targets.numel(), 9, k.seq_index)
    starts = torch.nonzero(torch.diff(k.seq_index, prepend=k.seq_index[:1] - 1)).squeeze(1).tolist()
    assert all(r0 in starts for r0, _ in bounds) and bounds[-1][1] == k.targets.numel()
    n, V, H = k.targets.numel(), 1009, 37
    assert flpl.choose_tiling(n, V, H, plan_chunks(n, V, torch.device("cpu"), 9), k) == "token"
    assert flpl.choose_tiling(n, V, H, plan_chunks(n, V, torch.device("cpu"), 5), k) == "vocab"


def test_edge_cases(impl):
    """Fully masked sequences (no response), single-token sequences, an equal-reward group (zero advantage:
    those rows are written as zeros without being read), both streams."""
    spec = [(3, 5, 0, 0), (4, 0, 0, 0), (1, 0, 0, 1), (2, 6, 0, 2), (2, 3, 0, 2), (1, 1, 1, 10), (3, 4, 1, 10),
            (2, 2, 1, 11), (1, 0, 1, 11)]
    rewards = [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]  # group 2: equal rewards
    case = make_case(spec, V=523, H=19, seed=40, rewards=rewards, temperature=1.0)
    config = PolicyLossConfig(**dict(FULL, temperature=1.0, entropy_coef=0.0, kl_coef=0.0))
    _compare(impl, case, config, chunk=None)
    # and under seq-mean aggregation (a fully masked sequence is not counted)
    _compare(impl, case, PolicyLossConfig(loss_agg_mode="seq-mean-token-mean"), tilings=("token",))


def test_no_compaction_non_loss_rows(impl):
    """Loss rows > 90 % of the tokens: no compaction; the non-loss rows (each sequence's last position) pass the
    GEMMs, are not read by the Triton epilogue, and get exactly zero gradient."""
    spec = [(1, 12, 0, 0), (1, 14, 0, 0), (1, 11, 1, 10), (1, 13, 1, 10)]
    case = make_case(spec, V=389, H=21, seed=45, rewards=[1.0, 0.0, 0.0, 1.0], temperature=1.0)
    assert case.batch.loss_mask.float().mean() > flpl.COMPACT_BELOW
    _compare(impl, case, PolicyLossConfig(**dict(FULL, temperature=1.0)), chunk=None, lambda_corr=0.5)
    got = run_fused(case, PolicyLossConfig(**dict(FULL, temperature=1.0)), impl.device)
    assert (got.d_hidden[~case.batch.loss_mask] == 0).all()


def test_nothing_in_the_loss(impl):
    """No loss token at all: loss exactly 0, zero gradients, metrics 0 (as the reference)."""
    spec = [(3, 0, 0, 0), (1, 0, 1, 10)]
    case = make_case(spec, V=97, H=8, seed=41, rewards=[1.0, 0.0], temperature=1.0)
    config = PolicyLossConfig(kl_coef=0.1)
    want = reference(case, config)
    for tiling, dw_accum in (("token", "fp32"), ("token", "weight"), ("vocab", "fp32")):
        got = run_fused(case, config, impl.device, tiling=tiling, dw_accum=dw_accum)
        assert got.loss == 0.0 and got.metrics == want.metrics
        assert (got.d_hidden == 0).all() and (got.d_weight == 0).all()
    # an empty batch (T = 0); with dw_accum="weight" no chunk runs, so dW must be zero-filled explicitly
    empty = Case(PackedBatch.from_sequences([]), torch.zeros(0, 8), torch.randn(97, 8), 1.0)
    for dw_accum in ("fp32", "weight"):
        got = run_fused(empty, PolicyLossConfig(), impl.device, dw_accum=dw_accum)
        assert got.loss == 0.0 and got.d_hidden.shape == (0, 8) and (got.d_weight == 0).all()


def test_no_correction_stream_equals_grpo(impl):
    spec = [s for s in SPEC if s[2] == 0]
    case = make_case(spec, seed=42, rewards=REWARDS[: len(spec)])
    config = PolicyLossConfig(**FULL)
    want = _compare(impl, case, config, tilings=("token",), lambda_corr=3.0)
    assert want.metrics["loss/corr"] == 0 and want.metrics["tokens/corr"] == 0


def test_large_vocab_few_tokens(impl):
    """V ≈ 50k with a handful of tokens, T/V/H multiples of no block size, temperature ≠ 1."""
    spec = [(2, 3, 0, 0), (3, 2, 0, 0), (1, 3, 1, 10)]
    case = make_case(spec, V=50257, H=23, seed=43, rewards=[1.0, 0.0, 1.0], temperature=1.3)
    _compare(impl, case, PolicyLossConfig(**dict(FULL, temperature=1.3)), lambda_corr=0.7)


def test_extreme_logits(impl):
    """Logits of size 1e4 (near one-hot distributions): no NaN/inf, scale-relative agreement."""
    case = make_case(V=2053, H=16, seed=44, temperature=0.8)
    case.hidden = case.hidden * (1e4 / float((case.hidden @ case.weight.t()).abs().max()))
    # re-place old/ref/rollout relative to the new float64 logp, at the usual distances from the clip boundaries
    logp64, _ = _logp_entropy(case.hidden.double(), case.weight.double(), case.batch.targets, 0.8)
    m = case.batch.loss_mask
    log_ratio = torch.log(RATIOS[torch.arange(case.batch.num_tokens) % len(RATIOS)])
    case.batch.old_logp = torch.where(m, logp64 - log_ratio, 0.0).float()
    case.batch.ref_logp = torch.where(m, logp64 + 0.3, 0.0).float()
    case.batch.rollout_logp = torch.where(m, case.batch.old_logp.double() - 0.5, 0.0).float()
    S = _logit_scale(case)
    assert S > 1e4
    config = PolicyLossConfig(**dict(FULL, temperature=0.8))
    want = reference(case, config)
    eps = 5e-6 * S
    for tiling in ("token", "vocab"):
        got = run_fused(case, config, impl.device, tiling=tiling, chunk_tokens=11)
        assert math.isfinite(got.loss) and all(math.isfinite(v) for v in got.metrics.values())
        assert_matches(got, want, eps, grad_tol=4 * 2.0**-24 * S, what=f"extreme/{tiling}")
        _check_ran(impl)


# ---------------------------------------------------------------------------------------------------------------
# bf16, composition with linear_logprob, float64 gradcheck
# ---------------------------------------------------------------------------------------------------------------


def _torch_bf16_path(case: Case, config: PolicyLossConfig, **kwargs) -> Result:
    """torch's own bf16 path: bf16 GEMM (logits rounded to bf16), fp32 log-softmax, the same loss, autograd."""
    h = case.hidden.clone().requires_grad_(True)
    w = case.weight.clone().requires_grad_(True)
    ref = materialized_policy_loss(h, w, case.batch, config, with_entropy=True, logits_dtype=torch.float32, **kwargs)
    ref.loss.backward()
    return Result(float(ref.loss.detach()), ref.metrics, h.grad.double(), w.grad.double())


@pytest.mark.parametrize("tiling", ["token", "vocab"])
def test_bf16_inputs(impl, tiling):
    case = make_case(seed=50, dtype=torch.bfloat16, temperature=0.9)
    config = PolicyLossConfig(**dict(FULL, temperature=0.9))
    want = reference(case, config, lambda_corr=0.5)
    ours = run_fused(case, config, impl.device, tiling=tiling, chunk_tokens=13, lambda_corr=0.5)
    theirs = _torch_bf16_path(case, config, lambda_corr=0.5)
    S = _logit_scale(case)
    h_max = float(_logp_entropy(case.hidden.double(), case.weight.double(), case.batch.targets, 0.9)[1].max())
    bound = 2 * BF16_U * S * (2 * h_max + 1) * want.gain + TOL_SUM * want.scale
    assert abs(ours.loss - want.loss) <= bound
    errors = {}
    for name, res in (("ours", ours), ("torch", theirs)):
        errors[name] = (abs(res.loss - want.loss),
                        float((res.d_hidden - want.d_hidden).norm() / want.d_hidden.norm()),
                        float((res.d_weight - want.d_weight).norm() / want.d_weight.norm()))
    for i, what in enumerate(("loss", "dH", "dW")):
        assert errors["ours"][i] <= 1.25 * errors["torch"][i] + 1e-6, (what, errors)
    _check_ran(impl)


@pytest.mark.parametrize("tiling", ["token", "vocab"])
def test_fp32_tiles_for_half_inputs(impl, monkeypatch, tiling):
    """The CUDA layout for bf16, simulated on CPU: fp32 logits tiles (``torch.mm(out_dtype=float32)`` has no CPU
    kernel, so an fp32 product stands in), ``dL/dz`` written straight into a separate bf16 GEMM operand (Triton) or
    copied there (torch). Errors must not exceed torch's bf16 path (whose logits are rounded to bf16)."""
    from cipo.kernels import _chunking

    def fp32_tile(h, w, buf):
        z = _chunking.tile_view(buf, h.shape[0], w.shape[0])
        torch.mm(h.float(), w.float().t(), out=z)
        return z

    monkeypatch.setattr(_chunking, "logits_dtype", lambda dtype, device: torch.float32)
    monkeypatch.setattr(_chunking, "logits_tile", fp32_tile)
    case = make_case(seed=52, dtype=torch.bfloat16, temperature=0.9)
    config = PolicyLossConfig(**dict(FULL, temperature=0.9))
    want = reference(case, config)
    ours = run_fused(case, config, impl.device, tiling=tiling, chunk_tokens=13)
    theirs = _torch_bf16_path(case, config)
    for name, a, b, r in (("dH", ours.d_hidden, theirs.d_hidden, want.d_hidden),
                          ("dW", ours.d_weight, theirs.d_weight, want.d_weight)):
        e_ours, e_theirs = float((a - r).norm() / r.norm()), float((b - r).norm() / r.norm())
        assert e_ours <= e_theirs, (name, e_ours, e_theirs)  # observed 0.45-0.7x
    assert abs(ours.loss - want.loss) <= abs(theirs.loss - want.loss) + TOL_SUM * want.scale
    _check_ran(impl)


def test_dw_accum_in_weight_dtype():
    """``dw_accum="weight"``: no fp32 ``V × H`` buffer; the cross-chunk sum is rounded to bf16 once per chunk, so
    dW's relative error grows to ≲ (chunks)·u/2 — bounded here by 4 chunks × 2⁻⁹ — and dH is unchanged."""
    case = make_case(seed=51, dtype=torch.bfloat16, temperature=0.9)
    config = PolicyLossConfig(**dict(FULL, temperature=0.9))
    want = reference(case, config)
    fp32 = run_fused(case, config, tiling="token", chunk_tokens=13)
    bf16 = run_fused(case, config, tiling="token", chunk_tokens=13, dw_accum="weight")
    assert torch.equal(fp32.d_hidden, bf16.d_hidden) and fp32.loss == bf16.loss
    rel = float((bf16.d_weight - want.d_weight).norm() / want.d_weight.norm())
    rel32 = float((fp32.d_weight - want.d_weight).norm() / want.d_weight.norm())
    assert rel <= rel32 + 4 * 2.0**-9, (rel, rel32)


def test_upstream_gradient_scales_half_gradients_in_fp32():
    """``(loss / 3).backward()`` with bf16 inputs: the stored gradients are scaled by the fp32 upstream gradient
    and rounded once — exactly ``bf16(g32 · dW)`` — not by ``bf16(1/3)`` (0.33398, a 0.2 % bias)."""
    case = make_case(seed=52, dtype=torch.bfloat16)
    config = PolicyLossConfig(**FULL)
    grads = []
    for scale in (None, torch.tensor(1.0 / 3.0)):
        h = case.hidden.clone().requires_grad_(True)
        w = case.weight.clone().requires_grad_(True)
        loss, _ = fused_linear_policy_loss(h, w, case.batch, config)
        (loss if scale is None else loss * scale).backward()
        grads.append((h.grad, w.grad))
    third = torch.tensor(1.0 / 3.0)
    for once, scaled in zip(grads[0], grads[1]):
        assert scaled.dtype == torch.bfloat16
        assert torch.equal(scaled, (once.float() * third).bfloat16())
        assert not torch.equal(scaled, (once.float() * third.bfloat16().float()).bfloat16())


def test_matches_linear_logprob_composition(impl):
    """fp32: equal to ``cipo_policy_loss(linear_logprob(...))`` (the unfused chunked path) and its gradients."""
    case = make_case(seed=60)
    config = PolicyLossConfig(**FULL)
    h = case.hidden.clone().requires_grad_(True)
    w = case.weight.clone().requires_grad_(True)
    logp, ent = linear_logprob(h, w, case.batch.targets, config.temperature, True)
    loss, metrics = cipo_policy_loss(logp, case.batch, config, entropy=ent, lambda_corr=0.5)
    loss.backward()
    want = Result(float(loss.detach()), metrics, h.grad.double(), w.grad.double())
    want.scale = reference(case, config, lambda_corr=0.5).scale
    for tiling in ("token", "vocab"):
        got = run_fused(case, config, impl.device, tiling=tiling, lambda_corr=0.5)
        assert_matches(got, want, 0.0, grad_tol=1e-5, what=f"composition/{tiling}")
    _check_ran(impl)


@pytest.mark.parametrize("tiling", ["token", "vocab"])
@pytest.mark.parametrize("tis_mode", ["token", "sequence"])
def test_finite_differences_float64(monkeypatch, tiling, tis_mode):
    """The torch path in float64 against central differences along random directions (every loss term active).

    Not ``torch.autograd.gradcheck``: it backpropagates twice through one graph, which the stored gradient does
    not allow (it is handed over, scaled in place). Off-policy only: on-policy the loss *value* does not depend on
    ``logp`` through the ratio (≡ 1) while its gradient is the policy gradient, by definition."""
    monkeypatch.setenv("CIPO_FORCE_TRITON", "0")
    spec = [(2, 3, 0, 0), (1, 2, 0, 0), (2, 2, 1, 10), (1, 3, 1, 10)]
    case = make_case(spec, V=11, H=4, seed=70, rewards=[1.0, 0.0, 0.0, 1.0], temperature=0.8)
    config = PolicyLossConfig(**dict(FULL, temperature=0.8, tis_mode=tis_mode))

    def loss_at(h, w):
        return fused_linear_policy_loss(h, w, case.batch, config, lambda_corr=0.5, tiling=tiling, chunk_tokens=3)[0]

    h = case.hidden.double().requires_grad_(True)
    w = case.weight.double().requires_grad_(True)
    loss_at(h, w).backward()
    gen = torch.Generator().manual_seed(71)
    eps = 1e-6
    for _ in range(4):
        uh = torch.randn(h.shape, generator=gen, dtype=torch.float64)
        uw = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            fd = (loss_at(h + eps * uh, w + eps * uw) - loss_at(h - eps * uh, w - eps * uw)) / (2 * eps)
        analytic = (h.grad * uh).sum() + (w.grad * uw).sum()
        assert abs(float(fd - analytic)) <= 1e-7 + 1e-6 * abs(float(analytic)), (float(fd), float(analytic))


# ---------------------------------------------------------------------------------------------------------------
# autograd contract, validation, tiling choice
# ---------------------------------------------------------------------------------------------------------------


def test_autograd_contract(monkeypatch):
    monkeypatch.setenv("CIPO_FORCE_TRITON", "0")
    case = make_case(seed=80)
    config = PolicyLossConfig(**FULL)
    base = run_fused(case, config)
    # hidden produced upstream: the gradient reaches the upstream parameters; the loss can be scaled
    a = torch.eye(case.hidden.shape[1]).requires_grad_(True)
    w = case.weight.clone().requires_grad_(True)
    loss, _ = fused_linear_policy_loss(case.hidden @ a, w, case.batch, config)
    (3.0 * loss).backward()
    torch.testing.assert_close(w.grad.double(), 3.0 * base.d_weight, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(a.grad.double(), 3.0 * case.hidden.double().t() @ base.d_hidden, rtol=1e-5,
                               atol=1e-7)
    # backward twice through one call is refused (the stored gradient is handed over, scaled in place)
    h = case.hidden.clone().requires_grad_(True)
    loss, _ = fused_linear_policy_loss(h, case.weight, case.batch, config)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()
    # frozen weight; no_grad: same loss, nothing to differentiate
    loss, _ = fused_linear_policy_loss(h.detach().requires_grad_(True), case.weight, case.batch, config)
    assert loss.requires_grad and abs(float(loss.detach()) - base.loss) <= 1e-6 * abs(base.loss)
    with torch.no_grad():
        loss, metrics = fused_linear_policy_loss(h, case.weight, case.batch, config)
    assert not loss.requires_grad and abs(float(loss) - base.loss) <= 1e-6 * abs(base.loss)
    assert metrics == base.metrics
    # non-contiguous hidden (column-major)
    hc = case.hidden.t().contiguous().t().requires_grad_(True)
    loss, _ = fused_linear_policy_loss(hc, case.weight, case.batch, config)
    loss.backward()
    torch.testing.assert_close(hc.grad.double(), base.d_hidden, rtol=1e-5, atol=1e-9)


def _bad_calls():
    case = make_case(seed=90, V=50, H=8)
    b, h, w = case.batch, case.hidden, case.weight
    T = b.num_tokens
    bad_targets = copy.copy(b)
    bad_targets.targets = b.targets.clone()
    bad_targets.targets[0] = 50
    masked_ignore = copy.copy(b)
    masked_ignore.loss_mask = b.loss_mask.clone()
    masked_ignore.loss_mask[int(b.cu_seqlens[1]) - 1] = True  # the last position of sequence 0: target -100
    no_ref = copy.copy(b)
    no_ref.ref_logp = None
    no_rollout = copy.copy(b)
    no_rollout.rollout_logp = None
    cfg = PolicyLossConfig()
    return [
        ("hidden_rows", (h[:-1], w, b, cfg), {}, rf"hidden.*T = batch.num_tokens = {T}.*\({T - 1}, 8\)"),
        ("hidden_3d", (h[None], w, b, cfg), {}, r"hidden.*\[T, H\].*\(1, "),
        ("weight_H", (h, torch.randn(50, 9), b, cfg), {}, r"weight.*\(50, 9\)"),
        ("dtype", (h, w.double(), b, cfg), {}, r"weight dtype torch.float64.*\(50, 8\)"),
        ("target_range", (h, w, bad_targets, cfg), {}, r"batch.targets.*\[0, V = 50\).*found 50"),
        ("masked_ignore", (h, w, masked_ignore, cfg), {}, r"loss_mask.*-100"),
        ("kl_without_ref", (h, w, no_ref, PolicyLossConfig(kl_coef=0.1)), {}, r"kl_coef > 0 needs ref_logp"),
        ("tis_without_rollout", (h, w, no_rollout, PolicyLossConfig(tis_mode="token")), {},
         r"tis_mode='token' needs rollout_logp"),
        ("lambda", (h, w, b, cfg), dict(lambda_corr=-1.0), r"lambda_corr"),
        ("advantages", (h, w, b, cfg), dict(advantages=torch.zeros(3)), r"advantages.*\[S\] = \(10,\).*\(3,\)"),
        ("tiling", (h, w, b, cfg), dict(tiling="rows"), r"tiling"),
        ("chunk", (h, w, b, cfg), dict(chunk_tokens=0), r"chunk_tokens"),
    ]


@pytest.mark.parametrize("name,args,kwargs,match", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_invalid_inputs(name, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fused_linear_policy_loss(*args, **kwargs)


def test_tiling_choice_at_gpu_shapes():
    """Token chunks (6·THV) when the fp32 dW accumulator + a tile fit 1.5 GiB, else vocab slabs (8·THV)."""
    case = make_case(seed=91, V=50, H=8)
    k = token_rows(case.batch, PolicyLossConfig())
    cuda = torch.device("cuda")
    for T, V, H, want in ((8192, 151936, 4096, "vocab"), (32768, 151936, 2560, "vocab"), (8192, 32000, 2048, "token"),
                          (300, 151936, 4096, "token"), (200000, 1000, 64, "token")):
        assert flpl.choose_tiling(T, V, H, plan_chunks(T, V, cuda), k) == want, (T, V, H)
    # accumulating dW in the weight dtype needs no V × H buffer: token chunks fit at the largest GPU target shape, in
    # the large chunks that the GPU measurements favour (1536 rows of fp32 logits + the bf16 operand: 1.30 GiB)
    rows = flpl.weight_accum_chunk_rows(151936, torch.bfloat16)
    assert rows == 1536 and flpl.tile_bytes(rows, 151936, torch.bfloat16) <= flpl.MEMORY_BUDGET_BYTES
    plan = plan_chunks(32768, 151936, cuda, rows)
    assert flpl.choose_tiling(32768, 151936, 4096, plan, k, "weight", torch.bfloat16) == "token"
    assert flpl.choose_tiling(32768, 151936, 4096, plan, k, "fp32", torch.bfloat16) == "vocab"
    assert flpl.weight_accum_chunk_rows(32000, torch.bfloat16) == 2048  # capped at the largest size measured


def test_dw_accum_auto_resolution():
    """``dw_accum="auto"``: the weight-dtype sum for half weights on CUDA (measured faster, error still half of
    torch's bf16 path), fp32 everywhere else; explicit choices are kept; anything else is refused."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert flpl.resolve_dw_accum("auto", cuda, torch.bfloat16) == "weight"
    assert flpl.resolve_dw_accum("auto", cuda, torch.float16) == "weight"
    assert flpl.resolve_dw_accum("auto", cuda, torch.float32) == "fp32"
    assert flpl.resolve_dw_accum("auto", cpu, torch.bfloat16) == "fp32"
    assert flpl.resolve_dw_accum("fp32", cuda, torch.bfloat16) == "fp32"
    assert flpl.resolve_dw_accum("weight", cpu, torch.float32) == "weight"
    case = make_case(seed=92, V=50, H=8)
    with pytest.raises(ValueError, match="dw_accum"):
        fused_linear_policy_loss(case.hidden, case.weight, case.batch, PolicyLossConfig(), dw_accum="bf16")


# ---------------------------------------------------------------------------------------------------------------
# memory bound of the CPU path
# ---------------------------------------------------------------------------------------------------------------


def test_cpu_path_memory_bound(monkeypatch):
    """fwd+bwd at T=8192, V=32000, H=256 (token tiling, entropy in the loss): peak extra memory ≤ 2 tiles (the
    tile + the torch epilogue's ``exp``) + the gradients + the fp32 dW accumulator + 2·T·H·4 (room for a gathered
    hidden copy and a dH temporary) + 16 MiB, far below the T × V logits."""
    monkeypatch.setenv("CIPO_FORCE_TRITON", "0")
    T, V, H = 8192, 32000, 256
    seq_len = 256
    spec = [(1 + (i % 3), seq_len - 1 - (i % 3), i % 2, i // 8 + 100 * (i % 2)) for i in range(T // seq_len)]
    gen = torch.Generator().manual_seed(0)
    seqs = [SequenceSample(torch.randint(0, V, (p,), generator=gen), torch.randint(0, V, (r,), generator=gen),
                           reward=float(i % 3 == 0), group_id=g, stream=s) for i, (p, r, s, g) in enumerate(spec)]
    batch = PackedBatch.from_sequences(seqs)
    assert batch.num_tokens == T
    hidden = torch.randn(T, H, generator=gen).requires_grad_(True)
    weight = (torch.randn(V, H, generator=gen) * 0.05).requires_grad_(True)
    config = PolicyLossConfig(entropy_coef=0.01)

    def fused():
        loss, _ = fused_linear_policy_loss(hidden, weight, batch, config)
        loss.backward()

    peak = cpu_peak_alloc_bytes(fused)
    plan = plan_chunks(int(batch.loss_mask.sum()), V, torch.device("cpu"))
    tile = plan.tile_elems * 4
    grads = (T * H + V * H) * 4
    bound = 2 * tile + grads + V * H * 4 + 2 * T * H * 4 + 16 * 2**20
    assert peak <= bound, f"peak {peak / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB"
    assert bound < T * V * 4 / 3
    assert torch.isfinite(weight.grad).all() and float(weight.grad.abs().sum()) > 0
