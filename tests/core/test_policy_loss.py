"""cipo.policy_loss against hand-computed cases and an independent loop implementation, in float64."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import cipo
from cipo import PolicyLossConfig, policy_loss

from .loop_reference import policy_loss_loop

EXACT = dict(rtol=1e-12, atol=1e-12)  # float64 library vs float64 loops: only summation order differs
APPROX = dict(rel=1e-12, abs=1e-12)


def one_token(logp: float, old: float, adv: float, **cfg) -> tuple[float, dict[str, float]]:
    t = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    loss, metrics = policy_loss(t(logp), t(old), t(adv), torch.ones(1, 1, dtype=torch.bool), PolicyLossConfig(**cfg))
    return loss.item(), metrics


# ----------------------------------------------------------------------------------- hand-computed branches


def test_unclipped_positive_advantage():
    # ratio 1.1 inside [0.8, 1.2]: L = -A·ρ = -2·1.1
    loss, m = one_token(math.log(1.1), 0.0, 2.0)
    assert loss == pytest.approx(-2.2, rel=1e-14)
    assert m["clipfrac"] == 0.0 and m["clipfrac_lower"] == 0.0


def test_upper_clip_side():
    # A=1, ρ=1.5 → L1=-1.5, L2=-1.2, max = -1.2 (clipped)
    loss, m = one_token(math.log(1.5), 0.0, 1.0)
    assert loss == pytest.approx(-1.2, rel=1e-14)
    assert m["clipfrac"] == 1.0


def test_clip_higher_uses_its_own_bound():
    loss, m = one_token(math.log(1.5), 0.0, 1.0, clip_ratio_high=0.28)
    assert loss == pytest.approx(-1.28, rel=1e-14)
    assert m["clipfrac"] == 1.0


def test_lower_clip_side():
    # A=-1, ρ=0.5 → L1=0.5, L2=0.8, max = 0.8; dual-clip bound 3 not reached
    loss, m = one_token(math.log(0.5), 0.0, -1.0)
    assert loss == pytest.approx(0.8, rel=1e-14)
    assert m["clipfrac"] == 1.0 and m["clipfrac_lower"] == 0.0


def test_dual_clip_caps_negative_advantage():
    # A=-1, ρ=4 → Lc = 4; dual-clip: min(4, 3·1) = 3
    loss, m = one_token(math.log(4.0), 0.0, -1.0)
    assert loss == pytest.approx(3.0, rel=1e-14)
    assert m["clipfrac_lower"] == 1.0


def test_dual_clip_disabled():
    loss, m = one_token(math.log(4.0), 0.0, -1.0, clip_ratio_c=None)
    assert loss == pytest.approx(4.0, rel=1e-14)
    assert m["clipfrac_lower"] == 0.0


def test_dual_clip_ignores_positive_advantage():
    # A=+1, ρ=4: clipped at 1.2 → -1.2; dual clip applies only to A<0
    loss, m = one_token(math.log(4.0), 0.0, 1.0)
    assert loss == pytest.approx(-1.2, rel=1e-14)
    assert m["clipfrac_lower"] == 0.0


def test_log_ratio_clamped_at_20():
    loss, m = one_token(50.0, 0.0, -1e-3, clip_ratio_c=None)
    assert loss == pytest.approx(1e-3 * math.exp(20.0), rel=1e-12)
    assert m["approx_kl"] == pytest.approx(-20.0)


@pytest.mark.parametrize(
    "kl_type, expected",
    [
        ("k1", -0.5), ("kl", -0.5),
        ("k2", 0.125), ("mse", 0.125),
        ("abs", 0.5),
        ("k3", math.exp(0.5) - 0.5 - 1), ("low_var_kl", math.exp(0.5) - 0.5 - 1),
    ],
)
def test_kl_types(kl_type: str, expected: float):
    t = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    cfg = PolicyLossConfig(kl_coef=0.1, kl_type=kl_type)
    loss, m = policy_loss(t(-1.0), t(-1.0), t(0.0), torch.ones(1, 1), cfg, ref_logp=t(-0.5))
    assert m["kl"] == pytest.approx(expected, rel=1e-14)
    assert loss.item() == pytest.approx(0.1 * expected, rel=1e-14)


@pytest.mark.parametrize("straight, base", [("k1+", "k1"), ("kl+", "k1"), ("k3+", "k3"), ("low_var_kl+", "k3"),
                                            ("abs+", "abs")])
def test_straight_through_kl_has_its_estimators_value_and_k2s_gradient(straight: str, base: str):
    """verl 0.9.1's ``+`` estimators: the value of the base estimator, the gradient of k2 (``logp − ref``), float64.
    Random tokens with a mask, so the value and gradient differ from both neighbours' by construction."""
    g = torch.Generator().manual_seed(7)
    logp = (-2.0 * torch.rand(3, 9, generator=g, dtype=torch.float64)).requires_grad_()
    old, ref = logp.detach() + 0.05 * torch.randn(3, 9, generator=g, dtype=torch.float64), \
        logp.detach() + 0.8 * torch.randn(3, 9, generator=g, dtype=torch.float64)
    adv, mask = torch.randn(3, 9, generator=g, dtype=torch.float64), torch.rand(3, 9, generator=g) > 0.3

    def run(kl_type: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        cfg = PolicyLossConfig(kl_coef=0.3, kl_type=kl_type)
        loss, metrics = policy_loss(logp, old, adv, mask, cfg, ref_logp=ref)
        (grad,) = torch.autograd.grad(loss, logp)
        return loss.detach(), grad, metrics

    loss_st, grad_st, m_st = run(straight)
    loss_base, grad_base, m_base = run(base)
    loss_k2, grad_k2, _ = run("k2")
    assert loss_st.item() == pytest.approx(loss_base.item(), rel=1e-14) and m_st["kl"] == m_base["kl"]
    torch.testing.assert_close(grad_st, grad_k2, rtol=1e-13, atol=1e-15)
    assert not torch.allclose(grad_st, grad_base) and abs(loss_st.item() - loss_k2.item()) > 1e-3
    assert PolicyLossConfig(kl_type="k2+").kl_estimator == "k2"  # k2's gradient is its own


def test_k3_is_clamped_at_10():
    t = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    _, m = policy_loss(t(-30.0), t(-30.0), t(0.0), torch.ones(1, 1), PolicyLossConfig(kl_coef=1.0),
                       ref_logp=t(-1.0))
    assert m["kl"] == 10.0


def test_entropy_bonus_is_subtracted():
    t = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    loss, m = policy_loss(t(0.0), t(0.0), t(1.0), torch.ones(1, 1), PolicyLossConfig(entropy_coef=0.01),
                          entropy=t(2.5))
    assert loss.item() == pytest.approx(-1.0 - 0.025, rel=1e-14)
    assert m["entropy"] == 2.5


def test_token_tis_cap_binds():
    # w = min(exp(old − rollout), C): exp(1) > 2 → capped at 2; second token exp(-0.5) below the cap
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    cfg = PolicyLossConfig(tis_mode="token", tis_cap=2.0, loss_agg_mode="token-sum")
    loss, m = policy_loss(t([0.0, 0.0]), t([0.0, 0.0]), t([1.0, 1.0]), torch.ones(2, dtype=torch.bool), cfg,
                          rollout_logp=t([-1.0, 0.5]))
    assert loss.item() == pytest.approx(-(2.0 + math.exp(-0.5)), rel=1e-14)
    assert m["tis_clipfrac"] == 0.5


def test_sequence_tis_uses_summed_log_ratio():
    # Σ(old − rollout) over the sequence = 0.3 + 0.4 = 0.7 → w = exp(0.7) = 2.01 > C = 2 → capped;
    # the masked third token's huge ratio must not count.
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    cfg = PolicyLossConfig(tis_mode="sequence", tis_cap=2.0, loss_agg_mode="token-sum")
    mask = torch.tensor([True, True, False])
    loss, m = policy_loss(t([0.0, 0.0, 0.0]), t([0.0, 0.0, 0.0]), t([1.0, 1.0, 1.0]), mask, cfg,
                          rollout_logp=t([-0.3, -0.4, -50.0]))
    assert loss.item() == pytest.approx(-4.0, rel=1e-14)
    assert m["tis_clipfrac"] == 1.0
    cfg = PolicyLossConfig(tis_mode="sequence", tis_cap=3.0, loss_agg_mode="token-sum")
    loss, _ = policy_loss(t([0.0, 0.0, 0.0]), t([0.0, 0.0, 0.0]), t([1.0, 1.0, 1.0]), mask, cfg,
                          rollout_logp=t([-0.3, -0.4, -50.0]))
    assert loss.item() == pytest.approx(-2 * math.exp(0.7), rel=1e-14)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_precomputed_is_weights_match_loops(mode: str):
    case = ragged_case(5)
    gen = torch.Generator().manual_seed(9)
    is_w = [[float(v) for v in 2.0 * torch.rand(n, generator=gen, dtype=torch.float64)] for n in case["lens"]]
    expected = policy_loss_loop(case["logp"], case["old"], case["adv"], case["mask"], agg=mode, tis_mode="token",
                                tis_cap=1.5, rollout=case["rollout"], is_weights=is_w)
    flat_w = torch.tensor([v for row in is_w for v in row], dtype=torch.float64, requires_grad=True)
    config = PolicyLossConfig(loss_agg_mode=mode, tis_mode="token", tis_cap=1.5)
    logp = packed(case, "logp").requires_grad_()
    loss, _ = policy_loss(logp, packed(case, "old"), torch.tensor(case["adv_seq"], dtype=torch.float64),
                          packed(case, "mask").bool(), config, rollout_logp=packed(case, "rollout"),
                          cu_seqlens=cu_seqlens(case), is_weights=flat_w)
    assert loss.item() == pytest.approx(expected, **APPROX)
    grad_logp, grad_w = torch.autograd.grad(loss, (logp, flat_w), allow_unused=True)
    assert grad_w is None and bool((grad_logp != 0).any())  # the weights are constants


def test_tis_weight_is_detached():
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    rollout = t([-0.7]).requires_grad_()
    logp = t([0.0]).requires_grad_()
    loss, _ = policy_loss(logp, t([0.0]), t([1.0]), torch.ones(1), PolicyLossConfig(tis_mode="token", tis_cap=3.0),
                          rollout_logp=rollout)
    loss.backward()
    assert rollout.grad is None
    assert logp.grad.item() == pytest.approx(-math.exp(0.7), rel=1e-14)


AGG_HAND = [
    # loss values [[1, 2, 3], [4, 5, -]] with the third token of row 2 masked
    ("token-mean", 15 / 5),
    ("token-sum", 15.0),
    ("seq-mean-token-sum", (6 + 9) / 2),
    ("seq-mean-token-mean", (2 + 4.5) / 2),
    ("seq-mean-token-sum-norm", (6 + 9) / 2 / 3),  # verl 0.9.1: seq-mean of the sums / L
]


@pytest.mark.parametrize("mode, expected", AGG_HAND)
def test_aggregation_modes_by_hand(mode: str, expected: float):
    # with A = -1 and ratio 1 every token's loss is 1; scale by values through the advantage
    adv = -torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    loss, _ = policy_loss(zeros, zeros, adv, mask, PolicyLossConfig(loss_agg_mode=mode))
    assert loss.item() == pytest.approx(expected, rel=1e-14)


def test_seq_mean_skips_fully_masked_sequences():
    adv = -torch.tensor([[1.0, 2.0], [7.0, 7.0]], dtype=torch.float64)
    zeros = torch.zeros(2, 2, dtype=torch.float64)
    mask = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    for mode, expected in [("seq-mean-token-sum", 3.0), ("seq-mean-token-mean", 1.5),
                           ("seq-mean-token-sum-norm", 3.0 / 2)]:
        loss, _ = policy_loss(zeros, zeros, adv, mask, PolicyLossConfig(loss_agg_mode=mode))
        assert loss.item() == pytest.approx(expected, rel=1e-14)


def test_loss_scale_factor_and_normalizer():
    adv = -torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    zeros = torch.zeros(1, 3, dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, _ = policy_loss(zeros, zeros, adv, mask, PolicyLossConfig(loss_agg_mode="seq-mean-token-sum-norm",
                                                                     loss_scale_factor=12.0))
    assert loss.item() == pytest.approx(0.5, rel=1e-14)
    loss, _ = policy_loss(zeros, zeros, adv, mask, PolicyLossConfig(), loss_normalizer=12)
    assert loss.item() == pytest.approx(0.5, rel=1e-14)
    # seq-mean-token-sum-norm over a micro-batch: / the global sequence count, then / the constant
    loss, _ = policy_loss(zeros, zeros, adv, mask, PolicyLossConfig(loss_agg_mode="seq-mean-token-sum-norm",
                                                                     loss_scale_factor=2.0), loss_normalizer=3)
    assert loss.item() == pytest.approx(1.0, rel=1e-14)


def test_empty_mask_gives_zero_loss_with_graph():
    logp = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    for mode in cipo.config.LOSS_AGG_MODES:
        loss, m = policy_loss(logp, logp.detach(), torch.ones(2), torch.zeros(2, 3, dtype=torch.bool),
                              PolicyLossConfig(loss_agg_mode=mode))
        assert loss.item() == 0.0 and m["clipfrac"] == 0.0
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_values_outside_the_mask_cannot_leak():
    logp = torch.tensor([[0.1, float("nan")]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.0, float("inf")]], dtype=torch.float64)
    loss, m = policy_loss(logp, old, torch.ones(1), torch.tensor([[True, False]]), PolicyLossConfig())
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in m.values())
    assert logp.grad[0, 1].item() == 0.0


# ----------------------------------------------------------------------------------- random vs loops


def ragged_case(seed: int, num_seqs: int = 5, max_len: int = 7):
    rng = random.Random(seed)
    lens = [rng.randint(1, max_len) for _ in range(num_seqs)]
    mk = lambda scale: [[rng.gauss(0, scale) for _ in range(n)] for n in lens]  # noqa: E731
    logp = [[-abs(v) for v in row] for row in mk(1.0)]
    old = [[lp + rng.gauss(0, 0.3) for lp in row] for row in logp]
    ref = [[lp + rng.gauss(0, 0.5) for lp in row] for row in logp]
    rollout = [[o + rng.gauss(0, 0.4) for o in row] for row in old]
    entropy = [[abs(v) for v in row] for row in mk(1.0)]
    adv_seq = [rng.gauss(0, 1) for _ in lens]
    adv = [[a] * n for a, n in zip(adv_seq, lens)]
    mask = [[int(rng.random() < 0.7) for _ in range(n)] for n in lens]
    mask[0] = [0] * lens[0]  # a fully masked sequence
    return dict(lens=lens, logp=logp, old=old, ref=ref, rollout=rollout, entropy=entropy, adv=adv,
                adv_seq=adv_seq, mask=mask)


def packed(case: dict, key: str) -> torch.Tensor:
    return torch.tensor([v for row in case[key] for v in row], dtype=torch.float64)


def padded(case: dict, key: str, fill: float = float("nan")) -> torch.Tensor:
    width = max(case["lens"])
    return torch.tensor([row + [fill] * (width - len(row)) for row in case[key]], dtype=torch.float64)


def cu_seqlens(case: dict) -> torch.Tensor:
    return torch.tensor([0] + list(itertools.accumulate(case["lens"])), dtype=torch.int32)


CONFIGS = [
    dict(loss_agg_mode=mode, clip_ratio_c=c, kl_coef=kl, kl_type=kt, entropy_coef=ent, tis_mode=tis, tis_cap=cap,
         clip_ratio_high=high)
    for mode, c, (kl, kt), ent, (tis, cap), high in [
        ("token-mean", 3.0, (0.0, "k3"), 0.0, (None, 2.0), 0.2),
        ("token-sum", None, (0.05, "k1"), 0.01, ("token", 1.5), 0.28),
        ("seq-mean-token-sum", 3.0, (0.1, "k2"), 0.0, ("sequence", 1.2), 0.2),
        ("seq-mean-token-mean", 2.0, (0.1, "abs"), 0.02, ("token", 5.0), 0.3),
        ("seq-mean-token-sum-norm", 3.0, (0.2, "low_var_kl"), 0.01, ("sequence", 3.0), 0.2),
        ("token-mean", 1.5, (0.3, "mse"), 0.05, ("token", 1.1), 0.2),
    ]
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c["loss_agg_mode"] + "-" + str(c["tis_mode"]) for c in CONFIGS])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_packed_and_padded_match_loops(cfg: dict, seed: int):
    case = ragged_case(seed)
    expected = policy_loss_loop(
        case["logp"], case["old"], case["adv"], case["mask"], clip_low=0.2, clip_high=cfg["clip_ratio_high"],
        clip_c=cfg["clip_ratio_c"], agg=cfg["loss_agg_mode"], kl_coef=cfg["kl_coef"], kl_type=cfg["kl_type"],
        ref=case["ref"], entropy_coef=cfg["entropy_coef"], entropy=case["entropy"], tis_mode=cfg["tis_mode"],
        tis_cap=cfg["tis_cap"], rollout=case["rollout"])
    config = PolicyLossConfig(**cfg)

    logp_packed = packed(case, "logp").requires_grad_()
    loss_packed, m_packed = policy_loss(
        logp_packed, packed(case, "old"), torch.tensor(case["adv_seq"], dtype=torch.float64),
        packed(case, "mask").bool(), config, ref_logp=packed(case, "ref"), rollout_logp=packed(case, "rollout"),
        entropy=packed(case, "entropy"), cu_seqlens=cu_seqlens(case))
    assert loss_packed.item() == pytest.approx(expected, **APPROX)

    logp_padded = padded(case, "logp").requires_grad_()
    loss_padded, m_padded = policy_loss(
        logp_padded, padded(case, "old"), padded(case, "adv"), padded(case, "mask", 0).bool(), config,
        ref_logp=padded(case, "ref"), rollout_logp=padded(case, "rollout"), entropy=padded(case, "entropy"))
    assert loss_padded.item() == pytest.approx(expected, **APPROX)
    assert m_packed.keys() == m_padded.keys()
    for key in m_packed:
        assert m_packed[key] == pytest.approx(m_padded[key], **APPROX), key

    loss_packed.backward()
    loss_padded.backward()
    width = max(case["lens"])
    valid = torch.tensor([[t < n for t in range(width)] for n in case["lens"]])
    torch.testing.assert_close(logp_padded.grad[valid], logp_packed.grad, **EXACT)
    assert not torch.isnan(logp_padded.grad).any()


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c["loss_agg_mode"] for c in CONFIGS])
def test_gradcheck_float64(cfg: dict):
    case = ragged_case(7, num_seqs=3, max_len=4)
    config = PolicyLossConfig(**cfg)
    old, ref, rollout = packed(case, "old"), packed(case, "ref"), packed(case, "rollout")
    mask, cu = packed(case, "mask").bool(), cu_seqlens(case)
    adv = torch.tensor(case["adv_seq"], dtype=torch.float64)

    def fn(logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        return policy_loss(logp, old, adv, mask, config, ref_logp=ref, rollout_logp=rollout, entropy=entropy,
                           cu_seqlens=cu)[0]

    inputs = (packed(case, "logp").requires_grad_(), packed(case, "entropy").requires_grad_())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_float32_and_bf16_inputs_return_float32():
    case = ragged_case(3)
    for dtype in (torch.float32, torch.bfloat16):
        logp = packed(case, "logp").to(dtype)
        loss, _ = policy_loss(logp, packed(case, "old").to(dtype), torch.tensor(case["adv_seq"]),
                              packed(case, "mask").bool(), PolicyLossConfig(), cu_seqlens=cu_seqlens(case))
        assert loss.dtype == torch.float32


def test_one_dimensional_without_cu_seqlens_is_one_sequence():
    case = ragged_case(4, num_seqs=1)
    logp, old, mask = packed(case, "logp"), packed(case, "old"), packed(case, "mask").bool()
    adv = torch.full_like(logp, case["adv_seq"][0])
    cfg = PolicyLossConfig(loss_agg_mode="seq-mean-token-mean")
    a, _ = policy_loss(logp, old, adv, mask, cfg)
    b, _ = policy_loss(logp[None], old[None], adv[None], mask[None], cfg)
    assert a.item() == b.item()


# ----------------------------------------------------------------------------------- bad input


def bad_call(**overrides):
    args = dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), advantages=torch.zeros(2),
                mask=torch.ones(2, 3, dtype=torch.bool), config=PolicyLossConfig())
    kwargs = {k: overrides.pop(k) for k in list(overrides) if k not in args}
    args.update(overrides)
    return policy_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"), args.pop("mask"),
                       args.pop("config"), **kwargs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(logp=torch.zeros(2, 3, dtype=torch.long)), "logp must be a floating tensor"),
        (dict(logp=torch.zeros(2, 3, 1)), r"logp must be \[B, L\]"),
        (dict(old_logp=torch.zeros(2, 4)), "old_logp must have logp's shape"),
        (dict(advantages=torch.zeros(3)), "advantages must have logp's shape"),
        (dict(advantages=torch.zeros(2, dtype=torch.long)), "advantages must be a floating tensor"),
        (dict(mask=torch.ones(3, 2)), "mask must have logp's shape"),
        (dict(mask=torch.full((2, 3), 0.5)), "mask must be bool or hold only 0 and 1"),
        (dict(config=PolicyLossConfig(kl_coef=0.1)), "needs ref_logp"),
        (dict(config=PolicyLossConfig(entropy_coef=0.1)), "needs entropy"),
        (dict(config=PolicyLossConfig(tis_mode="token")), "needs rollout_logp"),
        (dict(ref_logp=torch.zeros(3)), "ref_logp must have logp's shape"),
        (dict(cu_seqlens=torch.tensor([0, 6])), "with cu_seqlens, logp must be packed"),
    ],
)
def test_bad_input_names_the_argument(overrides: dict, message: str):
    with pytest.raises(ValueError, match=message):
        bad_call(**overrides)


@pytest.mark.parametrize("cu, message", [
    (torch.tensor([0, 2, 5]), "rise from 0 to the token count 6"),
    (torch.tensor([1, 6]), "rise from 0"),
    (torch.tensor([0, 4, 2, 6]), "rise from 0"),
    (torch.tensor([0.0, 6.0]), "1-D integer tensor"),
])
def test_bad_cu_seqlens(cu: torch.Tensor, message: str):
    z = torch.zeros(6)
    with pytest.raises(ValueError, match=message):
        policy_loss(z, z, z, torch.ones(6, dtype=torch.bool), PolicyLossConfig(), cu_seqlens=cu)
