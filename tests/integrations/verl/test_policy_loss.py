"""The registered ``cipo`` policy loss equals verl 0.9.1's own ``vanilla`` loss, and cipo's aggregation equals
verl's ``agg_loss``, in float64.

Tolerance: 1e-12 relative (floor 1 on the scale), in every mode. ``seq-mean-token-mean`` needs a word: verl
divides each sequence's sum by ``count + 1e-8`` and cipo by ``count`` (docs/DESIGN.md §4 is law). With the bool
``response_mask`` verl's ``ppo_loss`` hands over, ``count`` is an int64 tensor and ``count + 1e-8`` is computed
in float32 (torch's default dtype), where it rounds back to ``count`` for every count >= 1: the two agree exactly.
Only a floating mask (a direct call) makes the epsilon real; then the difference is exactly
``(dp/G) · Σ_s S_s · δ / (n_s (n_s + δ))`` with ``δ = 1e-8``, ``S_s`` the sequence's masked sum and ``n_s`` its
token count, bounded in ``test_float_mask_seq_mean_token_mean_bound`` by ``(dp/G) · Σ_s |S_s| · δ / n_s²`` plus
the 1e-12 rounding allowance; each gradient entry differs by the factor ``n_s / (n_s + δ)``, at most ``δ · |g|``.
verl's metrics divide by ``count + 1e-8`` the same way (exact with bool masks, 1e-8 relative with float ones);
its clip fractions are float32 means (``.float()``), so they agree to one float32 ulp.
"""

from __future__ import annotations

import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

import cipo  # noqa: E402
import cipo.integrations.verl as cipo_verl  # noqa: E402

MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
RTOL = 1e-12
DELTA = 1e-8  # verl's epsilon in seq-mean-token-mean and masked_mean
FLOAT32_RTOL = 2 ** -23  # one float32 ulp (relative): verl's clip fractions are float32 means
METRICS = ["actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"]

torch.set_num_threads(1)


def make_inputs(seed: int = 0, lengths=(7, 3, 0, 5, 1), width: int = 7) -> dict[str, torch.Tensor]:
    """Random float64 inputs in verl's padded layout: odd lengths, an empty row, extreme log-ratios, signs of A."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = torch.zeros(b, width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    old = -torch.rand(b, width, generator=g, dtype=torch.float64) * 3
    log_ratio = torch.randn(b, width, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, width).clone()
    # row 0, token by token: beyond the ±20 clamp (A > 0: ε-clip; A < 0: dual-clip), ratio ~0 (A < 0: low
    # clip), ratio e³ with A < 0 (dual-clip), ratio 1.22 with A > 0 (between 1 + 0.2 and 1 + 0.28: tells ε_high
    # apart), ratio 0.74 with A < 0 (below 1 − ε_low), ratio 1
    log_ratio[0] = torch.tensor([25.0, 25.0, -25.0, 3.0, 0.2, -0.3, 0.0], dtype=torch.float64)
    adv[0] = torch.tensor([1.0, -1.0, -0.5, -0.8, 1.3, -0.7, 0.9], dtype=torch.float64)
    log_ratio[3, :3] = torch.tensor([-0.25, 0.26, 40.0], dtype=torch.float64)
    adv[3, 2] = 0.0
    weights = torch.rand(b, width, generator=g, dtype=torch.float64) * 3
    return {"old_log_prob": old, "log_prob0": old + log_ratio, "advantages": adv, "response_mask": mask,
            "rollout_is_weights": weights}


def actor_config(loss_scale_factor=None, **overrides) -> ActorConfig:
    kwargs = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2,
                  clip_ratio_high=0.28, clip_ratio_c=3.0, loss_scale_factor=loss_scale_factor)
    kwargs.update(overrides)
    return ActorConfig(**kwargs)


def run(fn, x: dict, rows: slice, mode: str, config, use_weights: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    logp = x["log_prob0"][rows].clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=x["old_log_prob"][rows], log_prob=logp, advantages=x["advantages"][rows],
                       response_mask=x["response_mask"][rows], loss_agg_mode=mode, config=config,
                       rollout_is_weights=x["rollout_is_weights"][rows] if use_weights else None)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, metrics


def seq_sums(x: dict, rows: slice, config, use_weights: bool) -> torch.Tensor:
    """S_s: each row's masked token sum of the per-token loss, from verl's vanilla itself (token-sum, one row)."""
    vanilla = core_algos.get_policy_loss_fn("vanilla")
    out = []
    for i in range(*rows.indices(x["log_prob0"].shape[0])):
        one = slice(i, i + 1)
        cfg = actor_config(clip_ratio_low=config.clip_ratio_low, clip_ratio_high=config.clip_ratio_high,
                           clip_ratio_c=config.clip_ratio_c)
        out.append(run(vanilla, x, one, "token-sum", cfg, use_weights)[0])
    return torch.stack(out)


def assert_loss_and_grad_equal(mode, ours, theirs, x, rows, config, use_weights, dp_size=1, n_seqs=None):
    (loss_c, grad_c, metrics_c), (loss_v, grad_v, metrics_v) = ours, theirs
    scale = max(1.0, abs(float(loss_v)))
    gscale = max(1.0, float(grad_v.abs().max()))
    if x["response_mask"].dtype == torch.bool:
        assert abs(float(loss_c - loss_v)) <= RTOL * scale, (mode, float(loss_c), float(loss_v))
        torch.testing.assert_close(grad_c, grad_v, rtol=0, atol=RTOL * gscale)
        metric_rtol = RTOL
    else:  # a floating mask: verl's count + 1e-8 is a float64 sum, so the epsilon shows (module docstring)
        assert mode == "seq-mean-token-mean"
        counts = x["response_mask"][rows].sum(-1)
        present = counts > 0
        if n_seqs is None:
            n_seqs = int(present.sum())
        sums = seq_sums(x, rows, config, use_weights)
        bound = dp_size / n_seqs * float((sums[present].abs() * DELTA / counts[present] ** 2).sum())
        assert abs(float(loss_c - loss_v)) <= bound + RTOL * scale, (float(loss_c), float(loss_v), bound)
        assert abs(float(loss_c - loss_v)) > RTOL * scale  # the known difference is real, and bounded
        torch.testing.assert_close(grad_c, grad_v, rtol=DELTA, atol=RTOL * gscale)
        metric_rtol = DELTA
    assert set(metrics_c) == set(METRICS) == set(metrics_v)
    assert metrics_c["actor/ppo_kl"] == pytest.approx(metrics_v["actor/ppo_kl"], rel=metric_rtol, abs=1e-15)
    for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower"):  # verl counts these in float32 (.float())
        assert metrics_c[key] == pytest.approx(metrics_v[key], rel=FLOAT32_RTOL, abs=1e-15), key


def test_registered_under_cipo():
    assert core_algos.get_policy_loss_fn("cipo") is cipo_verl.compute_policy_loss_cipo
    assert core_algos.get_policy_loss_fn("vanilla") is core_algos.compute_policy_loss_vanilla


@pytest.mark.parametrize("use_weights", [False, True], ids=["no-is", "is-weights"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip", ["dapo", "symmetric"])
def test_equals_vanilla_local(mode, use_weights, clip):
    """No global batch info (verl's agg_loss defaults: local counts, dp 1), two clip settings."""
    x = make_inputs(seed=1)
    if clip == "dapo":
        config = actor_config()
    else:  # clip_ratio_low/high None fall back to clip_ratio; a wide dual-clip bound
        config = actor_config(clip_ratio=0.1, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=10.0)
    rows = slice(None)
    ours = run(core_algos.get_policy_loss_fn("cipo"), x, rows, mode, config, use_weights)
    theirs = run(core_algos.get_policy_loss_fn("vanilla"), x, rows, mode, config, use_weights)
    assert_loss_and_grad_equal(mode, ours, theirs, x, rows, config, use_weights)


@pytest.mark.parametrize("loss_scale_factor", [None, 37.0])
@pytest.mark.parametrize("use_weights", [False, True], ids=["no-is", "is-weights"])
@pytest.mark.parametrize("mode", MODES)
def test_equals_vanilla_dp2(mode, use_weights, loss_scale_factor):
    """Two data-parallel shards with verl's global_batch_info: each shard equals vanilla's, and, as DDP averages
    gradients over ranks, the mean of the two shards' losses and gradients equals the whole batch's."""
    x = make_inputs(seed=2)
    mask = x["response_mask"]
    shards = [slice(0, 3), slice(3, 5)]
    n_present = int((mask.sum(-1) > 0).sum())
    losses, grads = [], []
    for rows in shards:
        config = actor_config(loss_scale_factor=loss_scale_factor)
        # as verl.workers.utils.losses.ppo_loss fills it (global_batch_size: the sequences of all ranks)
        config.global_batch_info.update(dp_size=2, batch_num_tokens=int(mask.sum()), global_batch_size=n_present,
                                        loss_scale_factor=loss_scale_factor)
        ours = run(core_algos.get_policy_loss_fn("cipo"), x, rows, mode, config, use_weights)
        theirs = run(core_algos.get_policy_loss_fn("vanilla"), x, rows, mode, config, use_weights)
        assert_loss_and_grad_equal(mode, ours, theirs, x, rows, config, use_weights, dp_size=2, n_seqs=n_present)
        losses.append(ours[0])
        grads.append(ours[1])
    whole_config = actor_config()
    whole_config.global_batch_info.update(loss_scale_factor=loss_scale_factor)
    whole_loss, whole_grad, _ = run(core_algos.get_policy_loss_fn("cipo"), x, slice(None), mode, whole_config,
                                    use_weights)
    assert float((losses[0] + losses[1]) / 2) == pytest.approx(float(whole_loss), rel=RTOL, abs=RTOL)
    torch.testing.assert_close(torch.cat(grads) / 2, whole_grad, rtol=0,
                               atol=RTOL * max(1.0, float(whole_grad.abs().max())))


def test_float_mask_seq_mean_token_mean_bound():
    """A floating 0/1 mask: verl's ``count + 1e-8`` is then float64 and the documented difference appears."""
    x = make_inputs(seed=7)
    x["response_mask"] = x["response_mask"].to(torch.float64)
    config = actor_config()
    ours = run(core_algos.get_policy_loss_fn("cipo"), x, slice(None), "seq-mean-token-mean", config, True)
    theirs = run(core_algos.get_policy_loss_fn("vanilla"), x, slice(None), "seq-mean-token-mean", config, True)
    assert_loss_and_grad_equal("seq-mean-token-mean", ours, theirs, x, slice(None), config, True)


def test_global_batch_size_counts_empty_rows_like_verl():
    """verl's trainer sets global_batch_size to every sequence of the mini-batch, empty ones included."""
    x = make_inputs(seed=3)
    config = actor_config()
    config.global_batch_info.update(dp_size=1, batch_num_tokens=None, global_batch_size=x["log_prob0"].shape[0])
    for mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        ours = run(core_algos.get_policy_loss_fn("cipo"), x, slice(None), mode, config, True)
        theirs = run(core_algos.get_policy_loss_fn("vanilla"), x, slice(None), mode, config, True)
        assert_loss_and_grad_equal(mode, ours, theirs, x, slice(None), config, True)


def test_refuses_what_it_cannot_map():
    x = make_inputs()
    fn = core_algos.get_policy_loss_fn("cipo")
    args = dict(old_log_prob=x["old_log_prob"], log_prob=x["log_prob0"], advantages=x["advantages"],
                response_mask=x["response_mask"])
    with pytest.raises(ValueError, match="loss_agg_mode"):
        fn(**args, loss_agg_mode="seq-mean-token-max", config=actor_config())
    with pytest.raises(ValueError, match="needs verl's actor config"):
        fn(**args, loss_agg_mode="token-mean", config=None)
    config = actor_config()
    config.global_batch_info.update(dp_size=2, cp_size=2)
    with pytest.raises(ValueError, match="cp_size"):
        fn(**args, loss_agg_mode="token-mean", config=config)
    config = actor_config()
    config.global_batch_info.update(dp_size=2, batch_num_tokens=None, global_batch_size=None)
    for mode in ("token-mean", "seq-mean-token-sum"):
        with pytest.raises(ValueError, match="required when dp_size > 1"):
            fn(**args, loss_agg_mode=mode, config=config)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        fn(**args, loss_agg_mode="token-mean", config=actor_config(clip_ratio_c=1.0))
    with pytest.raises(ValueError, match=r"padded \[B, L\]"):
        fn(**{k: v.reshape(-1) for k, v in args.items()}, loss_agg_mode="token-mean", config=actor_config())


def test_float32_triton_path_matches_vanilla(monkeypatch):
    """The Triton kernel (interpreted on CPU) behind the registered loss, float32, against vanilla in float64."""
    monkeypatch.setenv("CIPO_FORCE_TRITON", "1")
    x64 = make_inputs(seed=4)
    x32 = {k: (v.float() if v.is_floating_point() else v) for k, v in x64.items()}
    config = actor_config()
    config.global_batch_info.update(dp_size=2, batch_num_tokens=int(x64["response_mask"].sum()),
                                    global_batch_size=5, loss_scale_factor=None)
    for mode in ("token-mean", "seq-mean-token-sum-norm"):
        loss32, grad32, _ = run(core_algos.get_policy_loss_fn("cipo"), x32, slice(None), mode, config, True)
        loss64, grad64, _ = run(core_algos.get_policy_loss_fn("vanilla"), x64, slice(None), mode, config, True)
        assert loss32.dtype == torch.float32
        assert float(loss32) == pytest.approx(float(loss64), rel=1e-5)
        torch.testing.assert_close(grad32.double(), grad64, rtol=1e-5, atol=1e-6 * float(grad64.abs().max()))


# ------------------------------------------------------------------------- part 1: agg_loss vs cipo directly


def _cipo_aggregate(values, mask, mode, *, kl=None, kl_type="low_var_kl", entropy=None, entropy_coef=0.0,
                    kl_coef=0.0, normalizer=None, dp_size=1, loss_scale_factor=None):
    """cipo.policy_loss with ratio 1 (old = logp) and A = −values, so that its per-token loss is ``values``."""
    logp = torch.zeros_like(values, requires_grad=True)
    cfg = cipo.PolicyLossConfig(loss_agg_mode=mode, loss_scale_factor=loss_scale_factor, kl_coef=kl_coef,
                                kl_type=kl_type, entropy_coef=entropy_coef)
    ref = None if kl is None else -kl  # k1 = logp − ref = kl
    loss, _ = cipo.policy_loss(logp, logp.detach(), -values, mask, cfg, ref_logp=ref, entropy=entropy,
                               loss_normalizer=normalizer)
    return loss * dp_size, logp


@pytest.mark.parametrize("split", ["local", "dp2"])
@pytest.mark.parametrize("mode", MODES)
def test_agg_loss_parity(mode, split):
    """verl's agg_loss (policy term + k1 KL term + entropy term, as verl's ppo_loss combines them) equals
    cipo.policy_loss's aggregation, with verl's global batch arguments mapped to loss_normalizer and dp_size."""
    g = torch.Generator().manual_seed(5)
    x = make_inputs(seed=5)
    mask = x["response_mask"]
    values = torch.randn(mask.shape, generator=g, dtype=torch.float64) * 2
    kl = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    entropy = torch.rand(mask.shape, generator=g, dtype=torch.float64) * 4
    beta, coef = 0.05, 0.01
    if split == "local":
        parts = [(slice(None), {}, None, 1)]
    else:
        n_present = int((mask.sum(-1) > 0).sum())
        glob = dict(dp_size=2, batch_num_tokens=int(mask.sum()), global_batch_size=n_present)
        count = glob["batch_num_tokens"] if mode == "token-mean" else glob["global_batch_size"]
        parts = [(slice(0, 2), glob, count, 2), (slice(2, 5), glob, count, 2)]
    for rows, glob, count, dp in parts:
        m, v, k, h = mask[rows], values[rows], kl[rows], entropy[rows]
        theirs = (core_algos.agg_loss(v, m, mode, **glob) + beta * core_algos.agg_loss(k, m, mode, **glob)
                  - coef * core_algos.agg_loss(h, m, mode, **glob))
        ours, _ = _cipo_aggregate(v, m, mode, kl=k, kl_type="k1", entropy=h, kl_coef=beta, entropy_coef=coef,
                                     normalizer=count if mode != "token-sum" else None, dp_size=dp)
        assert float(ours.detach()) == pytest.approx(float(theirs), rel=RTOL, abs=RTOL), (mode, rows)
        # d loss / d logp at ratio 1 is the per-token coefficient of agg times the value: compare with verl's
        values_leaf = v.clone().requires_grad_(True)
        (coeff,) = torch.autograd.grad(core_algos.agg_loss(values_leaf, m, mode, **glob), values_leaf)
        ours_pg, logp_pg = _cipo_aggregate(v, m, mode, normalizer=count if mode != "token-sum" else None,
                                           dp_size=dp)
        (grad,) = torch.autograd.grad(ours_pg, logp_pg)
        torch.testing.assert_close(grad, coeff * v, rtol=0, atol=RTOL * max(1.0, float((coeff * v).abs().max())))


@pytest.mark.parametrize("loss_scale_factor", [None, 1024.0])
def test_seq_mean_token_sum_norm_is_verl_091(loss_scale_factor):
    """The part-1 defect pinned: mean over non-empty sequences of the token sums, ÷ factor (not Σ / factor)."""
    x = make_inputs(seed=6)
    mask = x["response_mask"]
    values = torch.randn(mask.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    theirs = core_algos.agg_loss(values, mask, "seq-mean-token-sum-norm", loss_scale_factor=loss_scale_factor)
    ours, _ = _cipo_aggregate(values, mask, "seq-mean-token-sum-norm", loss_scale_factor=loss_scale_factor)
    factor = loss_scale_factor or mask.shape[-1]
    by_hand = (values * mask).sum(-1)[mask.any(-1)].mean() / factor
    ours = float(ours.detach())
    assert ours == pytest.approx(float(theirs), rel=RTOL)
    assert ours == pytest.approx(float(by_hand), rel=RTOL)
    old_formula = (values * mask).sum() / factor
    assert abs(ours - float(old_formula)) > 1e-3 * abs(float(old_formula))


# ---------------------------------------------------------------- through verl's own caller (workers/utils/losses)


def _ppo_loss_data(seed: int, dp_size: int, with_kl: bool):
    """A TensorDict as verl's FSDP engine hands a micro-batch to ``ppo_loss``: flat log-probs of prompt+response
    tokens, padded response fields, the global batch counts as non-tensor data."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(seed)
    resp_len = torch.tensor([5, 2, 0, 3])
    b, p, r = len(resp_len), 2, 5
    resp_mask = (torch.arange(r)[None] < resp_len[:, None]).long()
    attn = torch.cat([torch.ones(b, p, dtype=torch.long), resp_mask], 1)
    fields = {
        "prompts": torch.randint(0, 50, (b, p), generator=g), "responses": torch.randint(0, 50, (b, r), generator=g),
        "attention_mask": attn, "response_mask": resp_mask,
        "old_log_probs": -torch.rand(b, r, dtype=torch.float64, generator=g),
        "advantages": torch.randn(b, 1, dtype=torch.float64, generator=g).expand(b, r).contiguous(),
        "rollout_is_weights": torch.rand(b, r, dtype=torch.float64, generator=g) * 2,
    }
    if with_kl:
        fields["ref_log_prob"] = -torch.rand(b, r, dtype=torch.float64, generator=g)
    data = TensorDict(fields, batch_size=[b])
    tu.assign_non_tensor(data, dp_size=dp_size, batch_num_tokens=int(resp_mask.sum()) * dp_size,
                         global_batch_size=b * dp_size)
    n_tokens = int(attn.sum())
    logp = -torch.rand(n_tokens, dtype=torch.float64, generator=g) * 2
    entropy = torch.rand(n_tokens, dtype=torch.float64, generator=g) * 3
    return data, logp, entropy


@pytest.mark.parametrize("dp_size", [1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_verl_ppo_loss_with_cipo_equals_vanilla(mode, dp_size):
    """verl's ppo_loss (fills global_batch_info, adds entropy and KL terms) with loss_mode=cipo vs vanilla."""
    from verl.utils.metric import Metric
    from verl.workers.config.actor import PolicyLossConfig as VerlPolicyLossConfig
    from verl.workers.utils.losses import ppo_loss

    results = {}
    for loss_mode in ("vanilla", "cipo"):
        data, logp0, ent0 = _ppo_loss_data(seed=8, dp_size=dp_size, with_kl=True)
        config = actor_config(policy_loss=VerlPolicyLossConfig(loss_mode=loss_mode), loss_agg_mode=mode,
                              entropy_coeff=0.01, use_kl_loss=True, kl_loss_coef=0.05, kl_loss_type="low_var_kl",
                              loss_scale_factor=11 if mode == "seq-mean-token-sum-norm" else None)
        logp, ent = logp0.clone().requires_grad_(True), ent0.clone().requires_grad_(True)
        loss, metrics = ppo_loss(config, {"log_probs": logp, "entropy": ent}, data)
        grads = torch.autograd.grad(loss, (logp, ent))
        values = {k: (v.aggregate() if isinstance(v, Metric) else v) for k, v in metrics.items()}
        results[loss_mode] = (loss.detach(), grads, values)
    (loss_v, grads_v, met_v), (loss_c, grads_c, met_c) = results["vanilla"], results["cipo"]
    assert float(loss_c) == pytest.approx(float(loss_v), rel=RTOL, abs=RTOL)
    for g_c, g_v in zip(grads_c, grads_v):
        torch.testing.assert_close(g_c, g_v, rtol=0, atol=RTOL * max(1.0, float(g_v.abs().max())))
    assert set(met_c) == set(met_v)
    for key in met_v:
        rel = FLOAT32_RTOL if "clipfrac" in key else RTOL
        assert float(met_c[key]) == pytest.approx(float(met_v[key]), rel=rel, abs=1e-15), key
