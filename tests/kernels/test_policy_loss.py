"""``cipo.policy_loss`` / ``cipo.cipo_policy_loss`` through the Triton kernel against the float64 reference.

Run: ``python -m pytest tests/kernels/test_policy_loss.py`` (tests/kernels/conftest.py sets
``TRITON_INTERPRET=1``; each call sets or clears ``CIPO_FORCE_TRITON`` itself through ``monkeypatch``).

Reference: the same public call on the same float32 values cast to float64, with ``CIPO_FORCE_TRITON`` unset
(torch path), gradients by autograd. Inputs use random values, so no ratio sits within rounding of a clip
boundary (where fp32 and float64 may pick different sides) — except ``logp == old`` exactly (ratio 1), whose
tie convention is checked against autograd of the reference in float32.

Tolerances (u = 2⁻²⁴; the kernel computes in fp32): a token's terms carry a relative error of a few u times
``max(|logp|, |old|, |ref|)`` (the exponent of the ratio is rounded before ``exp``), and the sums a few u more.
So for the loss and the loss-like metrics (``loss/*``, ``pg_loss``, ``kl``, ``entropy``):
``|Δ| ≤ 1e-5 · M`` with ``M`` = the float64 aggregate of the *absolute* per-token terms
(``Σ_p max(1, w_p)·agg_p(|pg| + |kl| + |H|)``) — the scale rounding errors are relative to, even when signed
terms cancel; ``approx_kl``: ``1e-5 · mean|log-ratio|``; the count ratios (``clipfrac*``, ``tis_clipfrac``) must
agree to 1e-12 (same decisions). Gradients, elementwise: ``|Δ| ≤ 1e-5·|g| + 1e-6·max|g|``.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import pytest
import torch
from cipo.kernels import policy_loss as plk
from cipo.kernels.policy_loss_torch import aggregate, token_terms

import cipo
from cipo import PackedBatch, PolicyLossConfig, SequenceSample, cipo_policy_loss, policy_loss
from cipo.loss import StreamPart, flatten_inputs, loss_plan

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
RTOL_SUM = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-6
BLOCK = plk.BLOCK


@pytest.fixture(autouse=True)
def _interpreter_active():
    if DEVICE == "cpu" and type(plk._policy_loss_fwd_kernel).__name__ != "InterpretedFunction":
        pytest.skip("cipo.kernels.policy_loss was imported before TRITON_INTERPRET=1 was set; run the kernel "
                    "tests in their own pytest process or set TRITON_INTERPRET=1 in the environment")


# ---------------------------------------------------------------------------------------------- helpers


def make_inputs(shape: tuple[int, ...], seed: int, *, mask_p: float = 0.75, spread: float = 0.6,
                per_seq_adv: bool = True) -> dict[str, torch.Tensor]:
    """float32 inputs of one loss call. The log-ratio spread puts tokens in every region: inside the clip
    range, beyond both clip sides, and past the dual-clip bound 3 (log 3 ≈ 1.1 ≈ 1.8 σ)."""
    gen = torch.Generator().manual_seed(seed)
    logp = -3.0 * torch.rand(shape, generator=gen)
    old = logp + spread * torch.randn(shape, generator=gen)
    num_adv = shape[0] if per_seq_adv and len(shape) == 2 else shape
    return {
        "logp": logp,
        "old_logp": old,
        "advantages": torch.randn(num_adv, generator=gen),
        "mask": torch.rand(shape, generator=gen) < mask_p,
        "ref_logp": logp + 0.4 * torch.randn(shape, generator=gen),
        "rollout_logp": old + 0.4 * torch.randn(shape, generator=gen),
        "entropy": 2.0 * torch.rand(shape, generator=gen),
    }


class Result:
    def __init__(self, loss: torch.Tensor, metrics: dict[str, float], grad_logp: Optional[torch.Tensor],
                 grad_ent: Optional[torch.Tensor]):
        self.loss, self.metrics = loss.detach(), metrics
        self.grad_logp = grad_logp.double().cpu() if grad_logp is not None else None
        self.grad_ent = grad_ent.double().cpu() if grad_ent is not None else None


def _force(monkeypatch, use_triton: bool) -> list:
    """Set the dispatch and count the Triton calls (the count proves which path ran)."""
    calls: list = []
    if use_triton:
        real = plk.policy_loss_triton

        def counting(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(plk, "policy_loss_triton", counting)
        monkeypatch.setenv("CIPO_FORCE_TRITON", "1")
    else:
        monkeypatch.delenv("CIPO_FORCE_TRITON", raising=False)
    return calls


def run_policy_loss(monkeypatch, use_triton: bool, inputs: dict[str, torch.Tensor], config: PolicyLossConfig,
                    **kwargs) -> Result:
    """``cipo.policy_loss`` on float32 (Triton, on DEVICE) or float64 CPU (reference) copies of ``inputs``."""
    dtype, device = (torch.float32, DEVICE) if use_triton else (torch.float64, "cpu")
    calls = _force(monkeypatch, use_triton)
    # Fresh leaves: never mark the caller's tensors as requiring grad.
    args = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)).clone() for k, v in inputs.items()}
    args["logp"].requires_grad_(True)
    if "entropy" in args:
        args["entropy"].requires_grad_(True)
    if "cu_seqlens" in kwargs:
        kwargs["cu_seqlens"] = kwargs["cu_seqlens"].to(device)
    loss, metrics = policy_loss(args["logp"], args["old_logp"], args["advantages"], args["mask"],
                                config, ref_logp=args.get("ref_logp"), rollout_logp=args.get("rollout_logp"),
                                entropy=args.get("entropy"), is_weights=args.get("is_weights"), **kwargs)
    assert loss.dtype == dtype and loss.dim() == 0
    loss.backward()
    monkeypatch.delenv("CIPO_FORCE_TRITON", raising=False)
    assert len(calls) == (1 if use_triton else 0)
    return Result(loss, metrics, args["logp"].grad, args["entropy"].grad if "entropy" in args else None)


def magnitude(inputs: dict[str, torch.Tensor], config: PolicyLossConfig, parts: list[tuple[torch.Tensor, float,
              Optional[float]]], cu_seqlens: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """Scale of the loss-like sums (``Σ_p max(1, w_p)·agg_p(|pg| + |kl| + |H|)``) and of ``approx_kl``, float64.

    ``parts``: (flat part mask, weight, normaliser) per stream part.
    """
    d = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    flat = flatten_inputs(d["logp"], d["old_logp"], d["advantages"], d["mask"], ref_logp=d.get("ref_logp"),
                          rollout_logp=d.get("rollout_logp"), entropy=d.get("entropy"), cu_seqlens=cu_seqlens,
                          is_weights=d.get("is_weights"))
    terms = token_terms(flat.logp, flat.old_logp, flat.advantages, flat.mask, flat.seq_index, flat.num_seqs,
                        clip_ratio_low=config.clip_ratio_low, clip_ratio_high=config.clip_ratio_high,
                        clip_ratio_c=config.clip_ratio_c,
                        kl_estimator=config.kl_estimator if flat.ref_logp is not None else None,
                        tis_mode=config.tis_mode, tis_cap=config.tis_cap, ref_logp=flat.ref_logp,
                        rollout_logp=flat.rollout_logp, entropy=flat.entropy, is_weights=flat.is_weights)
    absolute = terms.pg.abs()
    if terms.kl is not None:
        absolute = absolute + terms.kl.abs()
    if terms.entropy is not None:
        absolute = absolute + terms.entropy.abs()
    scale = config.loss_scale_factor if config.loss_scale_factor is not None else flat.default_scale
    total = 0.0
    for mask, weight, normalizer in parts:
        total += max(1.0, weight) * float(aggregate(absolute, mask, flat.seq_index, flat.num_seqs,
                                                    config.loss_agg_mode, scale_factor=scale,
                                                    normalizer=normalizer))
    nlr = terms.neg_log_ratio.abs()
    count = int(flat.mask.sum())
    kl_scale = float(torch.where(flat.mask, nlr, 0.0).sum()) / max(count, 1)
    return total, kl_scale


COUNT_METRICS = ("clipfrac", "clipfrac_lower", "tis_clipfrac")


def assert_matches(got: Result, want: Result, scale: float, kl_scale: float) -> None:
    assert list(got.metrics) == list(want.metrics), "metric keys (and their order) must match the reference"
    tol = RTOL_SUM * scale + 1e-12
    assert abs(got.loss.item() - want.loss.item()) <= tol, (got.loss.item(), want.loss.item(), tol)
    for key, value in want.metrics.items():
        if key in COUNT_METRICS:
            assert got.metrics[key] == pytest.approx(value, abs=1e-12), key
        elif key == "approx_kl":
            assert abs(got.metrics[key] - value) <= RTOL_SUM * kl_scale + 1e-12, key
        else:
            assert abs(got.metrics[key] - value) <= tol, (key, got.metrics[key], value, tol)
    for g, w in ((got.grad_logp, want.grad_logp), (got.grad_ent, want.grad_ent)):
        assert (g is None) == (w is None), "gradient presence must match the reference"
        if w is not None:
            assert torch.isfinite(g).all()
            atol = GRAD_ATOL * float(w.abs().max()) if w.numel() else 0.0
            torch.testing.assert_close(g, w, rtol=GRAD_RTOL, atol=atol + 1e-30)


def compare_policy_loss(monkeypatch, inputs: dict[str, torch.Tensor], config: PolicyLossConfig,
                        **kwargs) -> tuple[Result, Result]:
    got = run_policy_loss(monkeypatch, True, inputs, config, **kwargs)
    want = run_policy_loss(monkeypatch, False, inputs, config, **kwargs)
    flat_mask = inputs["mask"].reshape(-1)
    scale, kl_scale = magnitude(inputs, config, [(flat_mask, 1.0, kwargs.get("loss_normalizer"))],
                                cu_seqlens=kwargs.get("cu_seqlens"))
    assert_matches(got, want, scale, kl_scale)
    return got, want


FULL = dict(kl_coef=0.1, kl_type="low_var_kl", entropy_coef=0.01, tis_mode="token", tis_cap=1.5)


# ---------------------------------------------------------------------------------------------- policy_loss


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
def test_aggregation_modes_padded(monkeypatch, mode):
    inputs = make_inputs((6, 45), seed=10)
    got, want = compare_policy_loss(monkeypatch, inputs, PolicyLossConfig(loss_agg_mode=mode, **FULL))
    # The data must exercise every branch, or the comparison proves little.
    for key in ("clipfrac", "clipfrac_lower", "tis_clipfrac"):
        assert 0.0 < want.metrics[key] < 1.0, key


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3", "abs", "k1+", "k3+", "abs+"])
def test_kl_estimators_packed(monkeypatch, kl_type):
    lens = torch.tensor([5, 1, 30, 12, 3, 40])
    inputs = make_inputs((int(lens.sum()),), seed=11)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32)
    inputs["advantages"] = torch.randn(len(lens), generator=torch.Generator().manual_seed(3))  # per sequence [S]
    compare_policy_loss(monkeypatch, inputs, PolicyLossConfig(kl_coef=0.2, kl_type=kl_type), cu_seqlens=cu)


def test_kl_metric_without_kl_in_loss(monkeypatch):
    # ref_logp given but kl_coef 0: the kl metric is reported, the loss and gradient ignore it.
    inputs = make_inputs((3, 20), seed=12)
    compare_policy_loss(monkeypatch, inputs, PolicyLossConfig(kl_coef=0.0, kl_type="k2"))


@pytest.mark.parametrize("clip", [
    dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0),  # clip-higher + dual-clip
    dict(clip_ratio_low=0.1, clip_ratio_high=0.5, clip_ratio_c=None),  # dual-clip off
    dict(clip_ratio_low=0.3, clip_ratio_high=0.0, clip_ratio_c=1.5),   # tight dual bound, no upper room
])
def test_clip_sides(monkeypatch, clip):
    inputs = {k: v for k, v in make_inputs((4, 64), seed=13, spread=0.8).items()
              if k not in ("ref_logp", "rollout_logp", "entropy")}
    got, want = compare_policy_loss(monkeypatch, inputs, PolicyLossConfig(**clip))
    assert want.metrics["clipfrac"] > 0
    assert (want.metrics["clipfrac_lower"] > 0) == (clip["clip_ratio_c"] is not None)
    assert got.grad_ent is None and "entropy" not in got.metrics and "kl" not in got.metrics


@pytest.mark.parametrize("tis_mode", ["token", "sequence"])
def test_truncated_importance_sampling(monkeypatch, tis_mode):
    inputs = make_inputs((8, 24), seed=14)
    # Sequence mode sums ~18 log-ratios of σ 0.4 per sequence (σ ≈ 1.7): a cap of 2 binds for some only.
    cap = 1.3 if tis_mode == "token" else 2.0
    got, want = compare_policy_loss(monkeypatch, inputs, PolicyLossConfig(tis_mode=tis_mode, tis_cap=cap))
    assert 0.0 < want.metrics["tis_clipfrac"] < 1.0


@pytest.mark.parametrize("mode,normalizer", [("token-mean", None), ("seq-mean-token-sum-norm", None),
                                             ("seq-mean-token-sum-norm", 9.0), ("seq-mean-token-mean", 13.0)])
def test_precomputed_importance_weights(monkeypatch, mode, normalizer):
    # verl's rollout_is_weights / TRL's IS correction, on top of token TIS; random weights in [0, 3).
    inputs = make_inputs((5, 37), seed=21)
    inputs["is_weights"] = 3.0 * torch.rand((5, 37), generator=torch.Generator().manual_seed(4))
    config = PolicyLossConfig(loss_agg_mode=mode, loss_scale_factor=40.0, **FULL)
    got, want = compare_policy_loss(monkeypatch, inputs, config, loss_normalizer=normalizer)
    # The weights must change the loss, or the comparison proves nothing about them.
    unweighted = run_policy_loss(monkeypatch, False, {k: v for k, v in inputs.items() if k != "is_weights"},
                                 config, loss_normalizer=normalizer)
    assert abs(unweighted.loss.item() - want.loss.item()) > 1e-3 * abs(want.loss.item())


def test_entropy_bonus_gradient(monkeypatch):
    inputs = make_inputs((3, 33), seed=15)
    config = PolicyLossConfig(entropy_coef=0.05, loss_agg_mode="seq-mean-token-mean")
    got, want = compare_policy_loss(monkeypatch, inputs, config)
    assert got.grad_ent is not None and bool((got.grad_ent != 0).any())


def test_entropy_without_coefficient_has_no_gradient(monkeypatch):
    # entropy_coef 0: the entropy metric is reported; like the reference, no gradient reaches entropy.
    inputs = make_inputs((2, 10), seed=16)
    got, want = compare_policy_loss(monkeypatch, inputs, PolicyLossConfig(entropy_coef=0.0))
    assert got.grad_ent is None and "entropy" in got.metrics


@pytest.mark.parametrize("mode,normalizer", [("token-mean", 500.0), ("seq-mean-token-mean", 11.0),
                                             ("seq-mean-token-sum", 7.0)])
def test_loss_normalizer(monkeypatch, mode, normalizer):
    inputs = make_inputs((4, 30), seed=17)
    compare_policy_loss(monkeypatch, inputs, PolicyLossConfig(loss_agg_mode=mode, **FULL), loss_normalizer=normalizer)


def test_loss_scale_factor(monkeypatch):
    inputs = make_inputs((3, 30), seed=18)
    compare_policy_loss(monkeypatch, inputs, PolicyLossConfig(loss_agg_mode="seq-mean-token-sum-norm",
                                                             loss_scale_factor=4096.0, **FULL))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_masked_and_single_token_sequences(monkeypatch, mode):
    # Packed: fully masked sequences (must not count in mean_seq), single-token sequences (masked and not),
    # an empty sequence; N = 1030 spans two blocks of 1024 with a ragged tail.
    lens = torch.tensor([1, 1, 0, 7, 1000, 3, 18])
    n = int(lens.sum())
    inputs = make_inputs((n,), seed=19)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    seq = torch.repeat_interleave(torch.arange(len(lens)), lens)
    inputs["mask"][seq == 1] = False   # single token, masked
    inputs["mask"][seq == 0] = True    # single token, in the loss
    inputs["mask"][seq == 3] = False   # fully masked sequence
    assert n > BLOCK and n % BLOCK != 0
    compare_policy_loss(monkeypatch, inputs, PolicyLossConfig(loss_agg_mode=mode, **FULL), cu_seqlens=cu)


def test_odd_length_padded(monkeypatch):
    inputs = make_inputs((3, 347), seed=20)  # N = 1041: two blocks, ragged tail
    compare_policy_loss(monkeypatch, inputs, PolicyLossConfig(loss_agg_mode="token-sum", **FULL))


def test_fully_masked_batch(monkeypatch):
    inputs = make_inputs((2, 9), seed=21)
    inputs["mask"][:] = False
    got, want = compare_policy_loss(monkeypatch, inputs, PolicyLossConfig(loss_agg_mode="seq-mean-token-mean", **FULL))
    assert float(got.loss) == 0.0 and bool((got.grad_logp == 0).all())


def test_empty_batch(monkeypatch):
    empty = torch.zeros(0)
    inputs = {"logp": empty, "old_logp": empty, "advantages": empty, "mask": torch.zeros(0, dtype=torch.bool),
              "ref_logp": empty, "rollout_logp": empty, "entropy": empty}
    for mode in ("token-mean", "seq-mean-token-mean"):
        got, want = compare_policy_loss(monkeypatch, inputs, PolicyLossConfig(loss_agg_mode=mode, **FULL),
                                        cu_seqlens=torch.tensor([0]))
        assert float(got.loss) == 0.0 and got.grad_logp.shape == (0,)


def test_extreme_log_ratios(monkeypatch):
    # |logp − old| > 20 for some tokens: the ratio saturates at e^±20 and its gradient is 0 there.
    inputs = make_inputs((4, 40), seed=22)
    gen = torch.Generator().manual_seed(5)
    far = torch.rand(inputs["logp"].shape, generator=gen) < 0.3
    sign = torch.where(torch.rand(inputs["logp"].shape, generator=gen) < 0.5, -1.0, 1.0)
    inputs["old_logp"] = torch.where(far, inputs["logp"] + sign * (21.0 + 5 * torch.rand(far.shape, generator=gen)),
                                     inputs["old_logp"])
    assert bool((far & inputs["mask"]).any())
    for clip_c in (3.0, None):  # without dual-clip, A < 0 with ratio e^20 gives a huge (finite) loss term
        compare_policy_loss(monkeypatch, inputs, PolicyLossConfig(clip_ratio_c=clip_c, **FULL))
    # Without KL (whose k3 gradient is live there) the saturated tokens get exactly no gradient.
    plain = {k: v for k, v in inputs.items() if k not in ("ref_logp", "entropy")}
    got, want = compare_policy_loss(monkeypatch, plain, PolicyLossConfig(clip_ratio_c=None, tis_mode="token"))
    assert bool((got.grad_logp.reshape(-1)[(far & inputs["mask"]).reshape(-1)] == 0).all())


def test_non_finite_values_outside_mask_do_not_leak(monkeypatch):
    inputs = make_inputs((3, 16), seed=23)
    outside = ~inputs["mask"]
    for key, bad in (("logp", float("nan")), ("old_logp", float("inf")), ("ref_logp", float("nan")),
                     ("rollout_logp", float("-inf")), ("entropy", float("nan"))):
        inputs[key] = torch.where(outside, bad, inputs[key])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy (interpreter) on the masked garbage
        got, want = compare_policy_loss(monkeypatch, inputs, PolicyLossConfig(**FULL))
    assert math.isfinite(float(got.loss)) and bool((got.grad_logp[outside] == 0).all())


@pytest.mark.parametrize("kl_type", ["abs", "k3"])
def test_on_policy_tie_matches_float32_autograd(monkeypatch, kl_type):
    # logp == old exactly (the first update on fresh rollouts): ratio 1, −Aρ == −A·clip(ρ): autograd's max
    # splits the tie half/half and both halves carry dρ — the kernel reproduces that: dlogp = −A·c.
    # ref == logp on every other token: |x| has derivative sign(0) = 0 there, k3 has 1 − e⁰ = 0.
    inputs = make_inputs((2, 50), seed=24)
    inputs["old_logp"] = inputs["logp"].clone()
    inputs["ref_logp"][:, ::2] = inputs["logp"][:, ::2]
    config = PolicyLossConfig(kl_coef=0.05, kl_type=kl_type)
    got = run_policy_loss(monkeypatch, True, inputs, config)
    _force(monkeypatch, False)
    logp = inputs["logp"].clone().requires_grad_(True)
    loss, _ = policy_loss(logp, inputs["old_logp"], inputs["advantages"], inputs["mask"], config,
                          ref_logp=inputs["ref_logp"], rollout_logp=inputs["rollout_logp"], entropy=inputs["entropy"])
    loss.backward()
    torch.testing.assert_close(got.grad_logp.float(), logp.grad, rtol=1e-6, atol=1e-9)


def test_float64_inputs_kernel_entry(monkeypatch):
    # policy_loss_triton called directly with float64 flat inputs (whether the public dispatch sends float64
    # here is cipo.loss's choice): computed in fp32, loss and gradients returned in float64.
    inputs = make_inputs((2, 20), seed=25)
    config = PolicyLossConfig(**FULL)
    d = {k: v.double().to(DEVICE) if v.is_floating_point() else v.to(DEVICE) for k, v in inputs.items()}
    logp = d["logp"].requires_grad_(True)
    ent = d["entropy"].requires_grad_(True)
    flat = flatten_inputs(logp, d["old_logp"], d["advantages"], d["mask"], ref_logp=d["ref_logp"],
                          rollout_logp=d["rollout_logp"], entropy=ent)
    plan = loss_plan(config, [StreamPart("all", flat.mask, 1.0)], flat.default_scale, has_ref=True, has_entropy=True)
    loss, sums = plk.policy_loss_triton(flat.logp, flat.old_logp, flat.advantages, flat.mask, flat.seq_index,
                                        flat.num_seqs, [flat.mask], plan, ref_logp=flat.ref_logp,
                                        rollout_logp=flat.rollout_logp, entropy=flat.entropy)
    metrics = plan.metrics(sums)
    loss.backward()
    assert loss.dtype == torch.float64 and logp.grad.dtype == torch.float64 and ent.grad.dtype == torch.float64
    want = run_policy_loss(monkeypatch, False, inputs, config)
    scale, kl_scale = magnitude(inputs, config, [(inputs["mask"].reshape(-1), 1.0, None)])
    got = Result(loss, {k: v for k, v in metrics.items() if k != "loss/all"}, logp.grad, ent.grad)
    assert_matches(got, want, scale, kl_scale)


def test_no_grad_call(monkeypatch):
    inputs = make_inputs((2, 8), seed=26)
    _force(monkeypatch, True)
    d = {k: v.to(DEVICE) for k, v in inputs.items()}
    with torch.no_grad():
        loss, metrics = policy_loss(d["logp"], d["old_logp"], d["advantages"], d["mask"], PolicyLossConfig())
    assert not loss.requires_grad and "pg_loss" in metrics


# ---------------------------------------------------------------------------------------------- cipo_policy_loss


def make_batch(seed: int, num_base_groups: int, num_corr_groups: int, group_size: int = 3) -> PackedBatch:
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for g in range(num_base_groups + num_corr_groups):
        stream = cipo.BASE_STREAM if g < num_base_groups else cipo.CORRECTION_STREAM
        for _ in range(group_size):
            plen = int(torch.randint(1, 5, (1,), generator=gen))
            rlen = int(torch.randint(0, 9, (1,), generator=gen))  # includes empty responses
            old = (-3.0 * torch.rand(rlen, generator=gen)).tolist()
            seqs.append(SequenceSample(
                prompt_ids=torch.randint(0, 50, (plen,), generator=gen).tolist(),
                response_ids=torch.randint(0, 50, (rlen,), generator=gen).tolist(),
                reward=float(torch.rand(1, generator=gen) < 0.5), group_id=100 * g + 7, stream=stream,
                old_logp=old, ref_logp=[v + 0.3 * float(torch.randn(1, generator=gen)) for v in old],
                rollout_logp=[v + 0.3 * float(torch.randn(1, generator=gen)) for v in old],
            ))
    return PackedBatch.from_sequences(seqs)


def run_cipo(monkeypatch, use_triton: bool, batch: PackedBatch, logp: torch.Tensor, entropy: torch.Tensor,
             config: PolicyLossConfig, **kwargs) -> Result:
    dtype, device = (torch.float32, DEVICE) if use_triton else (torch.float64, "cpu")
    calls = _force(monkeypatch, use_triton)
    lp = logp.to(device, dtype).clone().requires_grad_(True)
    ent = entropy.to(device, dtype).clone().requires_grad_(True)
    if "advantages" in kwargs and kwargs["advantages"] is not None:
        kwargs["advantages"] = kwargs["advantages"].to(device, dtype)
    loss, metrics = cipo_policy_loss(lp, batch.to(device), config, entropy=ent, **kwargs)
    loss.backward()
    monkeypatch.delenv("CIPO_FORCE_TRITON", raising=False)
    assert len(calls) == (1 if use_triton else 0)
    return Result(loss, metrics, lp.grad, ent.grad)


def batch_logp(batch: PackedBatch, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logp = batch.old_logp + 0.6 * torch.randn(batch.num_tokens, generator=gen)
    return logp, 2.0 * torch.rand(batch.num_tokens, generator=gen)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_cipo_joint_loss(monkeypatch, mode):
    batch = make_batch(seed=30, num_base_groups=4, num_corr_groups=3)
    logp, entropy = batch_logp(batch, seed=31)
    adv = torch.randn(batch.num_seqs, generator=torch.Generator().manual_seed(32))
    config = PolicyLossConfig(loss_agg_mode=mode, **FULL)
    kwargs = dict(lambda_corr=0.35, advantages=adv, base_normalizer=None, corr_normalizer=9.0)
    got = run_cipo(monkeypatch, True, batch, logp, entropy, config, **kwargs)
    want = run_cipo(monkeypatch, False, batch, logp, entropy, config, **kwargs)
    stream = batch.token_stream()
    inputs = {"logp": logp, "old_logp": batch.old_logp, "advantages": adv, "mask": batch.loss_mask,
              "ref_logp": batch.ref_logp, "rollout_logp": batch.rollout_logp, "entropy": entropy}
    parts = [(batch.loss_mask & (stream == cipo.BASE_STREAM), 1.0, None),
             (batch.loss_mask & (stream == cipo.CORRECTION_STREAM), 0.35, 9.0)]
    scale, kl_scale = magnitude(inputs, config, parts, cu_seqlens=batch.cu_seqlens)
    assert_matches(got, want, scale, kl_scale)
    assert got.metrics["tokens/corr"] > 0 and got.metrics["loss/corr"] != 0.0


def test_cipo_default_advantages(monkeypatch):
    # Advantages from the rewards inside the call: Triton group advantages on the forced path.
    batch = make_batch(seed=33, num_base_groups=3, num_corr_groups=2, group_size=4)
    logp, entropy = batch_logp(batch, seed=34)
    config = PolicyLossConfig(**FULL)
    got = run_cipo(monkeypatch, True, batch, logp, entropy, config, lambda_corr=2.0)
    want = run_cipo(monkeypatch, False, batch, logp, entropy, config, lambda_corr=2.0)
    stream = batch.token_stream()
    adv = cipo.group_advantages(batch.reward.double(), batch.group_id)
    inputs = {"logp": logp, "old_logp": batch.old_logp, "advantages": adv, "mask": batch.loss_mask,
              "ref_logp": batch.ref_logp, "rollout_logp": batch.rollout_logp, "entropy": entropy}
    parts = [(batch.loss_mask & (stream == cipo.BASE_STREAM), 1.0, None),
             (batch.loss_mask & (stream == cipo.CORRECTION_STREAM), 2.0, None)]
    scale, kl_scale = magnitude(inputs, config, parts, cu_seqlens=batch.cu_seqlens)
    assert_matches(got, want, scale, kl_scale)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_cipo_without_corrections_equals_policy_loss_exactly(monkeypatch, mode):
    batch = make_batch(seed=35, num_base_groups=4, num_corr_groups=0)
    logp, entropy = batch_logp(batch, seed=36)
    adv = torch.randn(batch.num_seqs, generator=torch.Generator().manual_seed(37))
    config = PolicyLossConfig(loss_agg_mode=mode, **FULL)
    joint = run_cipo(monkeypatch, True, batch, logp, entropy, config, lambda_corr=0.7, advantages=adv,
                     base_normalizer=40.0 if mode == "token-mean" else None, corr_normalizer=13.0)
    inputs = {"logp": logp, "old_logp": batch.old_logp, "advantages": adv, "mask": batch.loss_mask,
              "ref_logp": batch.ref_logp, "rollout_logp": batch.rollout_logp, "entropy": entropy}
    plain = run_policy_loss(monkeypatch, True, inputs, config, cu_seqlens=batch.cu_seqlens,
                            loss_normalizer=40.0 if mode == "token-mean" else None)
    assert joint.loss.item() == plain.loss.item()
    assert torch.equal(joint.grad_logp, plain.grad_logp) and torch.equal(joint.grad_ent, plain.grad_ent)
    # loss/<part> metrics are the float64 sums, the loss is rounded to float32.
    assert joint.metrics["loss/corr"] == 0.0 and joint.metrics["loss/base"] == pytest.approx(plain.loss.item(),
                                                                                            rel=1e-7)
    for key, value in plain.metrics.items():
        assert joint.metrics[key] == value, key
