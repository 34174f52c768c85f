"""Tests of ``cipo.kernels.linear_logprob``: Triton (interpreter) and chunked torch epilogues vs a float64 reference.

Run: ``TRITON_INTERPRET=1 python -m pytest tests/kernels/test_linear_logprob.py`` (the conftests set
``TRITON_INTERPRET=1`` when there is no GPU; the Triton cases set ``CIPO_FORCE_TRITON=1`` themselves).

Reference: ``linear_logprob_reference`` in float64 on the same inputs (for half inputs: on the half-rounded
values, i.e. ``h.double()``), full ``[T, V]`` logits, autograd for the gradients. ``S`` = max |logit / temperature|.

Tolerances:
* fp32 inputs — logp, entropy (max abs error): ``5e-6 · max(1, S)`` (fp32 logits carry ~1e-7·S rounding, the
  fp32 sums over V a few more ulps; worst observed 0.35 of it, the torch path's entropy at V = 50257).
  Gradients, elementwise: ``2e-5 · max|ref| + 2e-5 · |ref|`` (worst observed 0.2 of it).
* half inputs (u = 2^-8 bf16, 2^-11 fp16) on CPU — the logits tile is in the input dtype (as in torch's own
  half path), so every scaled logit carries |δs| ≤ u·S. Then |δ logp| ≤ |δs_t| + |δ lse| ≤ 2u·S and
  |δ entropy| = |Σ p (log p + H) δs| ≤ 2H·u·S. Tolerances: logp ``2u·S + 1e-4``, entropy ``2u·S·(2H + 1) + 1e-4``.
  Gradients (relative Frobenius norm): p carries relative error ≤ 2u·S, dZ and the GEMM outputs are rounded
  to the half dtype (≤ 3u): ``2 · (2u·S + 3u)``. These worst-case bounds are loose (10-100x the observed error),
  so the test also requires every error to be ≤ 1.25x that of torch's own half path on the same inputs (half
  GEMM, fp32 log-softmax, autograd) — the GPU suite's accuracy target; measured ratios 1.00-1.07.
* extreme logits (S ≈ 1.25e4, fp32): the fp32 rules above (scale-relative), no NaN/inf anywhere; for an
  entropy-only loss (true gradient ~1e-12) the gradients' relative Frobenius error ≤ 4·2^-24·S.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
from cipo.kernels import linear_logprob as ll
from cipo.kernels._chunking import TILE_BYTES, plan_chunks
from cipo.kernels.linear_logprob import (
    OnlineRowStats,
    _linear_logprob,
    linear_logprob,
    softmax_grad_,
    update_row_stats_,
)
from cipo.kernels.linear_logprob_ref import linear_logprob_reference

from bench.profiling import cpu_peak_alloc_bytes

assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available(), "conftest sets TRITON_INTERPRET"

HALF_U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
#: Where the Triton cases run: CPU tensors under the interpreter, CUDA tensors on a GPU machine that compiles.
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Impl:
    name: str
    calls: dict[str, int]
    device: str


@pytest.fixture(params=["torch", "triton"])
def impl(request, monkeypatch) -> Impl:
    """Select the epilogue implementation (and device); for "triton", count kernel launches to prove they ran."""
    monkeypatch.setenv("CIPO_FORCE_TRITON", "1" if request.param == "triton" else "0")
    calls = {"stats": 0, "grad": 0}
    if request.param == "triton":
        stats_fn, grad_fn = ll._update_row_stats_triton_, ll._softmax_grad_triton_

        def stats_spy(*args, **kwargs):
            calls["stats"] += 1
            return stats_fn(*args, **kwargs)

        def grad_spy(*args, **kwargs):
            calls["grad"] += 1
            return grad_fn(*args, **kwargs)

        monkeypatch.setattr(ll, "_update_row_stats_triton_", stats_spy)
        monkeypatch.setattr(ll, "_softmax_grad_triton_", grad_spy)
    return Impl(request.param, calls, TRITON_DEVICE if request.param == "triton" else "cpu")


def _check_ran(impl: Impl, grad: bool = True) -> None:
    if impl.name == "triton":
        assert impl.calls["stats"] > 0, "Triton row-stats kernel never ran"
        if grad:
            assert impl.calls["grad"] > 0, "Triton softmax-grad kernel never ran"


def _make(T, V, H, dtype=torch.float32, scale=1.0, n_ignored=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(T, H, generator=gen) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / math.sqrt(H) * 2.0).to(dtype)
    targets = torch.randint(0, V, (T,), generator=gen)
    if n_ignored:
        targets[torch.randperm(T, generator=gen)[:n_ignored]] = -100
    g_logp = torch.randn(T, generator=gen)
    g_ent = torch.randn(T, generator=gen)
    return hidden, weight, targets, g_logp, g_ent


def _loss(logp, ent, g_logp, g_ent, grads):
    if grads == "logp":
        return (logp * g_logp).sum()
    if grads == "entropy":
        return (ent * g_ent).sum()
    return (logp * g_logp).sum() + (ent * g_ent).sum()


def _run(fn, hidden, weight, targets, temperature, g_logp, g_ent, grads="both", device="cpu", **kw):
    """Forward + backward of ``fn`` on ``device``; returns (logp, entropy or None, dH, dW) on the CPU."""
    h = hidden.detach().to(device, copy=True).requires_grad_(True)
    w = weight.detach().to(device, copy=True).requires_grad_(True)
    want_ent = grads != "logp"
    out = fn(h, w, targets.to(device), temperature, want_ent, **kw)
    logp, ent = out if want_ent else (out, None)
    dt = logp.dtype
    _loss(logp, ent, g_logp.to(device, dt), g_ent.to(device, dt), grads).backward()
    return logp.detach().cpu(), None if ent is None else ent.detach().cpu(), h.grad.cpu(), w.grad.cpu()


def _reference(hidden, weight, targets, temperature, g_logp, g_ent, grads="both"):
    return _run(linear_logprob_reference, hidden.double(), weight.double(), targets, temperature, g_logp, g_ent, grads)


def _scale(hidden, weight, temperature) -> float:
    return float((hidden.double() @ weight.double().t()).abs().max()) / temperature


def _assert_fp32_close(got, ref, S, what):
    logp, ent, dh, dw = got
    r_logp, r_ent, r_dh, r_dw = ref
    tol = 5e-6 * max(1.0, S)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), r_logp, rtol=0, atol=tol, msg=f"{what}: logp")
    if ent is not None:
        torch.testing.assert_close(ent.double(), r_ent, rtol=0, atol=tol, msg=f"{what}: entropy")
    for name, g, r in (("dH", dh, r_dh), ("dW", dw, r_dw)):
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), f"{what}: {name} not finite"
        torch.testing.assert_close(g.double(), r, rtol=2e-5, atol=2e-5 * float(r.abs().max()), msg=f"{what}: {name}")


# ---------------------------------------------------------------------------------------------------------------
# accuracy vs float64
# ---------------------------------------------------------------------------------------------------------------

# (T, V, H, temperature, chunk_tokens, axis, n_ignored): sizes chosen to be multiples of no block size.
CASES = {
    "ragged_chunks": (37, 1003, 48, 0.7, 8, None, 3),
    "vocab_50k_few_tokens": (5, 50257, 24, 1.0, None, None, 1),
    "token_axis_forced": (70, 301, 40, 1.3, 16, "token", 5),
    "more_tokens_than_vocab": (300, 97, 16, 0.9, 64, None, 7),
    "single_token": (1, 777, 33, 1.7, None, None, 0),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("grads", ["both", "logp", "entropy"])
def test_matches_float64_reference(impl, case, grads):
    T, V, H, temp, chunk, axis, n_ign = CASES[case]
    hidden, weight, targets, g_logp, g_ent = _make(T, V, H, n_ignored=n_ign, seed=list(CASES).index(case))
    got = _run(_linear_logprob, hidden, weight, targets, temp, g_logp, g_ent, grads, impl.device, chunk_tokens=chunk,
               axis=axis)  # fmt: skip
    ref = _reference(hidden, weight, targets, temp, g_logp, g_ent, grads)
    _assert_fp32_close(got, ref, _scale(hidden, weight, temp), f"{case}/{grads}")
    _check_ran(impl)


@pytest.mark.parametrize("axis", ["vocab", "token"])
def test_noncontiguous_inputs_and_int32_targets(impl, axis):
    _, _, targets, g_logp, g_ent = _make(19, 513, 40, n_ignored=2)
    hidden = torch.randn(40, 19).t()  # [19, 40], column-major
    weight = torch.randn(40, 513).t() / 3  # [513, 40], column-major
    got = _run(_linear_logprob, hidden, weight, targets.int(), 1.1, g_logp, g_ent, device=impl.device,
               chunk_tokens=6, axis=axis)  # fmt: skip
    ref = _reference(hidden, weight, targets, 1.1, g_logp, g_ent)
    _assert_fp32_close(got, ref, _scale(hidden, weight, 1.1), "noncontiguous")
    _check_ran(impl)


def _torch_half_path(hidden, weight, targets, temperature, g_logp, g_ent):
    """torch's own half-precision path: half GEMM (logits rounded to half), fp32 log-softmax, autograd."""
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp, ent = linear_logprob_reference(h, w, targets, temperature, return_entropy=True, logits_dtype=torch.float32)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("axis", ["vocab", "token"])
def test_half_inputs(impl, dtype, axis):
    T, V, H, temp = 29, 2051, 64, 0.9
    hidden, weight, targets, g_logp, g_ent = _make(T, V, H, dtype=dtype, n_ignored=2, seed=3)
    ours = _run(_linear_logprob, hidden, weight, targets, temp, g_logp, g_ent, device=impl.device, chunk_tokens=7,
                axis=axis)  # fmt: skip
    ref = _reference(hidden, weight, targets, temp, g_logp, g_ent)
    logp, ent, dh, dw = ours
    r_logp, r_ent, r_dh, r_dw = ref
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert dh.dtype == dtype and dw.dtype == dtype
    # analytic worst-case bounds (module docstring)
    u, S = HALF_U[dtype], _scale(hidden, weight, temp)
    assert (logp.double() - r_logp).abs().max() <= 2 * u * S + 1e-4
    ent_tol = 2 * u * S * (2 * float(r_ent.max()) + 1) + 1e-4
    assert (ent.double() - r_ent).abs().max() <= ent_tol
    grad_tol = 2 * (2 * u * S + 3 * u)
    for name, g, r in (("dH", dh, r_dh), ("dW", dw, r_dw)):
        rel = float((g.double() - r).norm() / r.norm())
        assert rel <= grad_tol, f"{name}: relative error {rel:.3g} > {grad_tol:.3g}"
    # the practical yardstick: no worse than torch's own half path (measured ratio 1.00-1.07), within 1.25x
    theirs = _torch_half_path(hidden, weight, targets, temp, g_logp, g_ent)
    for i, name in enumerate(("logp", "entropy", "dH", "dW")):
        if i < 2:
            e_ours, e_theirs = ((x.double() - ref[i]).abs().max() for x in (ours[i], theirs[i]))
        else:
            e_ours, e_theirs = ((x.double() - ref[i]).norm() / ref[i].norm() for x in (ours[i], theirs[i]))
        msg = f"{name}: error {float(e_ours):.3g} vs torch's half path {float(e_theirs):.3g}"
        assert e_ours <= 1.25 * e_theirs + 1e-6, msg
    _check_ran(impl)


@pytest.mark.parametrize("axis", ["vocab", "token"])
@pytest.mark.parametrize("grads", ["both", "entropy"])
def test_extreme_logits(impl, axis, grads):
    """Hidden scaled so logits reach ~1e4: max-subtraction keeps everything finite and accurate.

    The entropy-only loss is a sharp check that the backward sees the forward's logits bit for bit: the
    distributions are nearly one-hot, so the true gradient is ~1e-12, while logits recomputed by a different
    GEMM tiling (off by ~1 ulp of 1e4, ~1e-3) would put ~1e-3 into it.
    """
    T, V, H, temp = 16, 4099, 32, 0.8
    hidden, weight, targets, g_logp, g_ent = _make(T, V, H, n_ignored=2, seed=5)
    hidden = hidden * (1e4 / float((hidden @ weight.t()).abs().max()))
    S = _scale(hidden, weight, temp)
    assert S > 1e4
    got = _run(_linear_logprob, hidden, weight, targets, temp, g_logp, g_ent, grads, impl.device, chunk_tokens=5,
               axis=axis)  # fmt: skip
    for t in got:
        assert torch.isfinite(t).all()
    ref = _reference(hidden, weight, targets, temp, g_logp, g_ent, grads)
    if grads == "both":
        _assert_fp32_close(got, ref, S, "extreme")
    else:
        # fp32 logits carry ~2^-24·S absolute rounding, i.e. that much relative error in every p_j and so in
        # every term of the (tiny) entropy gradient: relative tolerance 4·2^-24·S (3e-3 here).
        tol = 4 * 2.0**-24 * S
        torch.testing.assert_close(got[1].double(), ref[1], rtol=0, atol=5e-6 * S)
        for name, g, r in (("dH", got[2], ref[2]), ("dW", got[3], ref[3])):
            rel = float((g.double() - r).norm() / r.norm())
            assert rel <= tol, f"{name}: relative error {rel:.3g} > {tol:.3g}"
    _check_ran(impl)


def test_ignore_index(impl):
    T, V, H = 12, 301, 24
    hidden, weight, targets, _, _ = _make(T, V, H, seed=7)
    targets[::3] = -100
    dev = impl.device
    h = hidden.to(dev, copy=True).requires_grad_(True)
    w = weight.to(dev, copy=True).requires_grad_(True)
    logp, ent = linear_logprob(h, w, targets.to(dev), 1.0, True, chunk_tokens=4)
    assert (logp[::3] == 0).all() and (logp[1::3] < 0).all()
    assert (ent[::3] > 0).all(), "entropy is computed for ignored rows too"
    logp.sum().backward()
    assert (h.grad[::3] == 0).all(), "no gradient through logp of ignored rows"
    # dW only from the kept rows
    keep = targets != -100
    ref_w = weight.double().clone().requires_grad_(True)
    linear_logprob_reference(hidden[keep].double(), ref_w, targets[keep]).sum().backward()
    torch.testing.assert_close(w.grad.double().cpu(), ref_w.grad, rtol=1e-4, atol=1e-6)
    # all rows ignored: logp all zero and no gradient at all
    h2 = hidden.to(dev, copy=True).requires_grad_(True)
    out = linear_logprob(h2, weight.to(dev), torch.full((T,), -100, device=dev), 1.0)
    assert (out == 0).all()
    out.sum().backward()
    assert (h2.grad == 0).all()
    _check_ran(impl)


def test_empty_tokens(impl):
    hidden = torch.randn(0, 16, device=impl.device, requires_grad=True)
    weight = torch.randn(50, 16, device=impl.device, requires_grad=True)
    logp, ent = linear_logprob(hidden, weight, torch.zeros(0, dtype=torch.long, device=impl.device), 1.0, True)
    assert logp.shape == (0,) and ent.shape == (0,) and logp.dtype == torch.float32
    (logp.sum() + ent.sum()).backward()
    assert hidden.grad.shape == (0, 16)
    assert weight.grad.shape == (50, 16) and (weight.grad == 0).all()


def test_frozen_weight_and_no_grad(impl):
    hidden, weight, targets, g_logp, _ = _make(9, 211, 16, seed=11)
    dev = impl.device
    h = hidden.to(dev, copy=True).requires_grad_(True)
    (linear_logprob(h, weight.to(dev), targets.to(dev)) * g_logp.to(dev)).sum().backward()
    ref_h = hidden.double().requires_grad_(True)
    (linear_logprob_reference(ref_h, weight.double(), targets) * g_logp.double()).sum().backward()
    torch.testing.assert_close(h.grad.double().cpu(), ref_h.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        out = linear_logprob(hidden.to(dev), weight.to(dev), targets.to(dev))
    assert not out.requires_grad
    _check_ran(impl)


def test_epilogues_interchangeable():
    """Triton and torch epilogues agree with float64 and each other: fp32/bf16 tiles, whole rows or 3 vocab slabs.

    The fused policy loss runs both epilogues on one tile, so the statistics epilogue must not modify it."""
    gen = torch.Generator().manual_seed(13)
    R, V = 7, 3001
    z32 = torch.randn(R, V, generator=gen) * 4
    targets = torch.randint(0, V, (R,), generator=gen)
    targets[2] = -100
    for z in (z32, z32.bfloat16()):
        s64 = z.double() * 0.8
        logprobs = torch.log_softmax(s64, dim=1)
        truth = (
            s64.amax(dim=1),
            torch.where(targets != -100, logprobs.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0),
            torch.logsumexp(s64, dim=1) - s64.amax(dim=1),
            -(logprobs.exp() * logprobs).sum(dim=1),
        )
        tol = 5e-6 * float(s64.abs().max())  # the fp32 rule of this file
        results = {}
        for path in (False, True):
            for bounds in ((0, V), (0, 1000, 2500, V)):
                dev = TRITON_DEVICE if path else "cpu"
                st = OnlineRowStats.empty(R, torch.float32, torch.device(dev), want_entropy=True)
                for v0, v1 in zip(bounds[:-1], bounds[1:]):
                    tile = z[:, v0:v1].to(dev, copy=True)
                    update_row_stats_(tile, v0, targets.to(dev), 0.8, st, triton_path=path)
                    assert torch.equal(tile.cpu(), z[:, v0:v1]), "the statistics epilogue must leave the tile intact"
                results[path, len(bounds) - 1] = tuple(x.cpu() for x in (st.row_max, *st.finalize(targets.to(dev))))
        for (path, n_slabs), got in results.items():
            for name, a, b in zip(("max", "logp", "log_norm", "entropy"), got, truth):
                msg = f"{z.dtype} triton={path} slabs={n_slabs} {name}"
                torch.testing.assert_close(a.double(), b, rtol=0, atol=tol, msg=msg)
        expected = results[False, 1]
        row_max, logp, log_norm, ent = expected
        g_logp = torch.where(targets != -100, torch.randn(R, generator=gen), 0.0)
        g_ent = torch.randn(R, generator=gen)
        off = 1000
        grads = {}
        for path in (False, True):
            dev = TRITON_DEVICE if path else "cpu"
            t = z[:, off : off + 900].to(dev, copy=True)
            args = (row_max, log_norm, ent, g_logp, g_ent)
            softmax_grad_(t, off, targets.to(dev), 0.8, *(x.to(dev) for x in args), triton_path=path)
            grads[path] = t.float().cpu()
        # bf16 tiles: both round the same fp32 value to bf16, at most one bf16 ulp apart
        atol = 1e-6 if z.dtype == torch.float32 else 2**-7 * float(grads[False].abs().max())
        torch.testing.assert_close(grads[False], grads[True], rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------------------------
# gradcheck, validation, plan
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", ["vocab", "token"])
def test_gradcheck_float64_cpu_path(monkeypatch, axis):
    monkeypatch.setenv("CIPO_FORCE_TRITON", "0")
    gen = torch.Generator().manual_seed(17)
    hidden = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.tensor([0, 6, -100, 3, 3])

    def fn(h, w):
        return _linear_logprob(h, w, targets, 0.8, True, chunk_tokens=2, axis=axis)

    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-8, rtol=1e-6)


def _bad_inputs():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, 4])
    return [
        ("hidden_3d", (h[None], w, t), r"hidden.*\(1, 4, 8\)"),
        ("hidden_int", (h.long(), w, t), r"hidden.*\(4, 8\).*int64"),
        ("hidden_weight_H", (h, torch.randn(10, 9), t), r"weight.*\(10, 9\)"),
        ("weight_1d", (h, torch.randn(10), t), r"weight.*\(10,\)"),
        ("dtype_mismatch", (h, w.double(), t), r"weight dtype.*\(10, 8\)"),
        ("targets_len", (h, w, t[:3]), r"targets.*\(3,\)"),
        ("targets_float", (h, w, t.float()), r"targets.*float32.*\(4,\)"),
        ("target_too_big", (h, w, torch.tensor([1, 10, 3, 4])), r"targets.*\(4,\).*\[0, 10\).*found 10"),
        ("target_negative", (h, w, torch.tensor([1, -1, 3, 4])), r"targets.*\(4,\).*found -1"),
    ]


@pytest.mark.parametrize("name,args,match", _bad_inputs(), ids=[b[0] for b in _bad_inputs()])
def test_invalid_inputs(name, args, match):
    with pytest.raises(ValueError, match=match):
        linear_logprob(*args)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_invalid_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        linear_logprob(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), bad)


def test_chunk_plan_rule():
    cuda = torch.device("cuda")
    plan = plan_chunks(8192, 151936, cuda)
    assert plan.chunk_tokens == 384 and plan.chunk_tokens * 151936 * 4 <= TILE_BYTES["cuda"]
    assert plan.vocab_slab == 8192 and 8192 * plan.vocab_slab * 4 <= TILE_BYTES["cuda"]
    plan = plan_chunks(32768, 151936, cuda)
    assert plan.vocab_slab == 2048
    plan = plan_chunks(8192, 32000, torch.device("cpu"))
    assert plan.chunk_tokens == 512 and plan.vocab_slab == 2048
    assert plan_chunks(3, 50, torch.device("cpu")).chunk_tokens == 3  # never more rows than tokens
    assert plan_chunks(10, 10**9, torch.device("cpu")).chunk_tokens == 1  # never below one row
    plan = plan_chunks(100, 1000, torch.device("cpu"), chunk_tokens=10)
    assert (plan.chunk_tokens, plan.vocab_slab, plan.tile_elems) == (10, 100, 10000)
    with pytest.raises(ValueError, match="chunk_tokens"):
        plan_chunks(100, 1000, torch.device("cpu"), chunk_tokens=0)


# ---------------------------------------------------------------------------------------------------------------
# memory bound of the CPU path
# ---------------------------------------------------------------------------------------------------------------


def test_cpu_path_memory_bound(monkeypatch):
    """fwd+bwd at T=8192, V=32000, H=256: peak extra memory ≤ 3 tiles + the gradients, far below T × V."""
    monkeypatch.setenv("CIPO_FORCE_TRITON", "0")
    torch.manual_seed(0)
    T, V, H = 8192, 32000, 256
    hidden = torch.randn(T, H, requires_grad=True)
    weight = (torch.randn(V, H) * 0.05).requires_grad_(True)
    targets = torch.randint(0, V, (T,))
    full_logits = T * V * 4

    def chunked():
        logp, ent = linear_logprob(hidden, weight, targets, 1.0, True)
        (logp.sum() + ent.sum()).backward()

    peak = cpu_peak_alloc_bytes(chunked)
    plan = plan_chunks(T, V, hidden.device)
    tile_bytes = plan.tile_elems * 4
    grads = (T * H + V * H) * 4
    bound = 3 * tile_bytes + grads + 16 * 2**20
    assert tile_bytes <= TILE_BYTES["cpu"]
    assert peak <= bound, f"peak {peak / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB"
    assert bound < full_logits / 3

    # The measurement sees big CPU allocations: the naive path at an eighth of the tokens exceeds its logits.
    T2 = T // 8
    h2, t2 = hidden[:T2].detach().requires_grad_(True), targets[:T2]

    def naive():
        logp, ent = linear_logprob_reference(h2, weight, t2, 1.0, True)
        (logp.sum() + ent.sum()).backward()

    assert cpu_peak_alloc_bytes(naive) >= T2 * V * 4
