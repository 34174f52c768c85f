"""Shared-prefix packing: the layout, and a loss + gradients equal to the plain packed batch's.

Tolerances: fp32 model, the two forwards differ only in the order of the attention's sums (a shorter key stream,
masked differently), so loss, metrics and every parameter gradient agree to 1e-5 relative (docs/LONG_CONTEXT.md); the
hidden states to 1e-5 absolute (they are O(1) after the final norm).
"""

from __future__ import annotations

import pytest
import torch

from cipo import PackedBatch, PolicyLossConfig, SequenceSample
from cipo.advantages import group_advantages
from cipo.models.tiny import build_tiny_model, build_tiny_tokenizer
from cipo.packing import BASE_STREAM, CORRECTION_STREAM, IGNORE_INDEX
from cipo.trainer.backend import PolicyModule
from cipo.trainer.forward import packed_hidden_states
from cipo.trainer.shared_prefix import (
    SharedPrefixLayout,
    check_model,
    shared_prefix_micro_batches,
)

RTOL = 1e-5


@pytest.fixture(scope="module")
def model():
    tok = build_tiny_tokenizer()
    return build_tiny_model(tokenizer=tok, seed=0, num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16).train()


def forward_tokens(batch: PackedBatch) -> int:
    """Tokens of ``batch``'s shared-prefix forward stream, counted here: each distinct prompt once, plus every
    response."""
    cu, plens = batch.cu_seqlens.tolist(), batch.prompt_len.tolist()
    ids = batch.input_ids.tolist()
    prompts = {tuple(ids[cu[s]:cu[s] + plens[s]]) for s in range(batch.num_seqs)}
    return sum(len(p) for p in prompts) + int(batch.num_tokens) - sum(plens)


def _ids(gen: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def mixed_batch(vocab: int, seed: int = 0) -> PackedBatch:
    """Groups with M = 3 (odd lengths, a 1-token response), M = 1, M = 2 (a 1-token prompt and an empty response),
    and a sequence of another group whose prompt equals the first group's (shares it too)."""
    g = torch.Generator().manual_seed(seed)
    corr = _ids(g, 7, vocab)
    one = _ids(g, 1, vocab)
    seqs = [
        SequenceSample(corr, _ids(g, 5, vocab), 1.0, 10, CORRECTION_STREAM, prefix_id=0),
        SequenceSample(corr, _ids(g, 1, vocab), 0.0, 10, CORRECTION_STREAM, prefix_id=0),
        SequenceSample(corr, _ids(g, 4, vocab), 1.0, 10, CORRECTION_STREAM, prefix_id=0),
        SequenceSample(_ids(g, 3, vocab), _ids(g, 6, vocab), 1.0, 0, BASE_STREAM),
        SequenceSample(one, _ids(g, 2, vocab), 0.0, 1, BASE_STREAM),
        SequenceSample(one, [], 1.0, 1, BASE_STREAM),
        SequenceSample(corr, _ids(g, 3, vocab), 0.0, 11, CORRECTION_STREAM, prefix_id=1),
    ]
    rng = torch.Generator().manual_seed(seed + 1)
    for s in seqs:  # off-policy old log-probs, so ratios and clipping are exercised
        s.old_logp = (-3.0 - torch.rand(len(s.response_ids), generator=rng)).tolist()
    return PackedBatch.from_sequences(seqs)


# ------------------------------------------------------------------------------------------------ the layout


def test_layout_shares_identical_prompts_and_continues_positions():
    batch = mixed_batch(vocab=50)
    layout = SharedPrefixLayout.build(batch)
    # distinct prompts: corr (7), base (3), one (1); responses 5+1+4+6+2+0+3
    assert layout.num_groups == 3
    assert layout.num_tokens == 7 + 3 + 1 + (5 + 1 + 4 + 6 + 2 + 0 + 3) == forward_tokens(batch)
    assert layout.num_batch_tokens == batch.num_tokens
    # segment 0: the correction prompt, then its 4 responses (rows 0, 1, 2, 6), each from position 7
    assert layout.position_ids[:7].tolist() == list(range(7))
    assert layout.position_ids[7:12].tolist() == list(range(7, 12))
    assert layout.position_ids[12:13].tolist() == [7]
    assert layout.branch[:7].tolist() == [-1] * 7
    assert layout.branch[7:12].tolist() == [0] * 5
    # the loss view is a valid packed batch: [last prompt token] + response per sequence, same loss rows
    view = layout.view
    view.validate()
    assert view.seq_lens.tolist() == [6, 2, 5, 7, 3, 1, 4]
    assert int(view.loss_mask.sum()) == int(batch.loss_mask.sum())
    assert torch.equal(view.targets[view.loss_mask], batch.targets[batch.loss_mask])
    assert torch.equal(view.old_logp[view.loss_mask], batch.old_logp[batch.loss_mask])
    assert torch.equal(batch.targets[layout.batch_index], view.targets)
    # each view token's hidden row holds the same token (prefix copy or own response)
    assert torch.equal(layout.input_ids[layout.hidden_index], view.input_ids)
    assert view.targets[view.cu_seqlens[1:].long() - 1].eq(IGNORE_INDEX).all()


def test_mask_rule_matches_its_definition():
    batch = mixed_batch(vocab=50)
    layout = SharedPrefixLayout.build(batch)
    mask = layout.dense_mask("sdpa", torch.float32)[0, 0]
    seg, br = layout.segment.tolist(), layout.branch.tolist()
    for q in range(layout.num_tokens):
        for k in range(layout.num_tokens):
            want = seg[q] == seg[k] and k <= q and (br[k] == -1 or br[k] == br[q])
            assert bool(mask[q, k]) == want, (q, k)
    eager = layout.dense_mask("eager", torch.float32)[0, 0]
    assert torch.equal(eager == 0, mask)


def test_no_sharing_gives_the_plain_stream():
    g = torch.Generator().manual_seed(3)
    seqs = [SequenceSample(_ids(g, p, 40), _ids(g, r, 40), 0.0, i) for i, (p, r) in enumerate([(2, 3), (5, 1)])]
    batch = PackedBatch.from_sequences(seqs)
    layout = SharedPrefixLayout.build(batch)
    assert torch.equal(layout.input_ids, batch.input_ids)
    assert torch.equal(layout.position_ids, batch.position_ids)
    assert forward_tokens(batch) == batch.num_tokens


def test_micro_batches_count_forward_tokens():
    batch = mixed_batch(vocab=50)  # lengths 12, 8, 11, 9, 3, 1, 10; prompts 7, 7, 7, 3, 1, 1, 7
    assert shared_prefix_micro_batches(batch, 20) == [[0, 1, 2], [3, 4, 5], [6]]  # 12+1+4 = 17; 9+3+0 = 12, +10
    assert shared_prefix_micro_batches(batch, 22) == [[0, 1, 2], [3, 4, 5, 6]]
    assert batch.micro_batches(22) == [[0, 1], [2, 3], [4, 5, 6]]  # the plain budget: one more micro-batch
    assert shared_prefix_micro_batches(batch, 10_000) == [list(range(7))]
    assert shared_prefix_micro_batches(batch, 1) == [[i] for i in range(7)]  # longer than the budget: alone
    with pytest.raises(ValueError, match="max_tokens"):
        shared_prefix_micro_batches(batch, 0)


def test_unsupported_models_are_refused(model):
    model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="attn_implementation"):
            check_model(model)
    finally:
        model.config._attn_implementation = "sdpa"
    model.config.layer_types = ["full_attention", "sliding_attention"]
    try:
        with pytest.raises(ValueError, match="sliding"):
            check_model(model)
    finally:
        model.config.layer_types = ["full_attention", "full_attention"]


# ------------------------------------------------------------------------------------------------ equality


def _step(module: PolicyModule, batch: PackedBatch, cfg: PolicyLossConfig, fused: bool):
    module.zero_grad(set_to_none=True)
    adv = group_advantages(batch.reward, batch.group_id)
    loss, metrics = module(batch, cfg, fused=fused, lambda_corr=0.7, advantages=adv)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.policy.named_parameters() if p.grad is not None}
    return float(loss.detach()), metrics, grads


def _assert_rel(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
    assert err <= RTOL, f"{what}: relative error {err:.2e} > {RTOL}"


@pytest.mark.parametrize("attn,agg,fused,ckpt", [
    ("sdpa", "token-mean", True, False),
    ("eager", "seq-mean-token-mean", True, False),
    ("sdpa", "seq-mean-token-sum", False, False),
    ("sdpa", "token-mean", True, True),
])
def test_loss_and_gradients_equal_the_plain_batch(model, attn, agg, fused, ckpt):
    model.config._attn_implementation = attn
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        batch = mixed_batch(model.config.vocab_size)
        cfg = PolicyLossConfig(loss_agg_mode=agg, clip_ratio_high=0.28, entropy_coef=0.01 if fused else 0.0)
        plain = PolicyModule(model, shared_prefix=False)
        shared = PolicyModule(model, shared_prefix=True)
        loss0, metrics0, grads0 = _step(plain, batch, cfg, fused)
        loss1, metrics1, grads1 = _step(shared, batch, cfg, fused)
    finally:
        model.config._attn_implementation = "sdpa"
        model.gradient_checkpointing_disable()
    assert abs(loss1 - loss0) <= RTOL * abs(loss0), (loss0, loss1)
    assert metrics1.keys() == metrics0.keys()
    for key in metrics0:
        assert metrics1[key] == pytest.approx(metrics0[key], rel=RTOL, abs=1e-7), key
    assert grads1.keys() == grads0.keys() and len(grads0) > 0
    for name in grads0:
        _assert_rel(grads1[name], grads0[name], name)
    assert shared.pop_token_counts() == (forward_tokens(batch), batch.num_tokens)
    assert plain.pop_token_counts() == (batch.num_tokens, batch.num_tokens)
    assert shared.pop_token_counts() == (0, 0)


def test_hidden_states_equal_at_every_loss_row(model):
    batch = mixed_batch(model.config.vocab_size, seed=5)
    layout = SharedPrefixLayout.build(batch)
    with torch.no_grad():
        plain = packed_hidden_states(model, batch.input_ids, batch.position_ids)
        shared = layout.hidden_states(model)
    torch.testing.assert_close(shared, plain[layout.batch_index], rtol=0, atol=1e-5)


def test_logp_only_scatters_to_the_plain_layout(model):
    batch = mixed_batch(model.config.vocab_size, seed=2)
    cfg = PolicyLossConfig()
    with torch.no_grad():
        plain = PolicyModule(model)(batch, cfg, logp_only=True)
        shared = PolicyModule(model, shared_prefix=True)(batch, cfg, logp_only=True)
    assert shared.shape == plain.shape == (batch.num_tokens,)
    mask = batch.loss_mask
    torch.testing.assert_close(shared[mask], plain[mask], rtol=1e-5, atol=1e-6)
    assert torch.all(shared[~mask] == 0)  # 0 outside the response rows, the packed layout's convention


def test_breaking_the_mask_is_detected(model, monkeypatch):
    """The equality test can fail: letting responses see each other changes the loss."""
    batch = mixed_batch(model.config.vocab_size)
    cfg = PolicyLossConfig()
    loss0, _, _ = _step(PolicyModule(model), batch, cfg, True)

    def leaky(self, q, k):
        return (self.segment[q] == self.segment[k]) & (k <= q)

    monkeypatch.setattr(SharedPrefixLayout, "allowed", leaky)
    loss1, _, _ = _step(PolicyModule(model, shared_prefix=True), batch, cfg, True)
    assert abs(loss1 - loss0) > 1e-4 * abs(loss0)


def test_flex_attention_forward_matches_sdpa_on_cpu(model):
    """The GPU path's mask through flex_attention (forward only: torch has no flex backward on CPU)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    batch = mixed_batch(model.config.vocab_size, seed=4)
    layout = SharedPrefixLayout.build(batch)
    with torch.no_grad():
        ref = layout.hidden_states(model)
        model.config._attn_implementation = "flex_attention"
        try:
            flex = layout.hidden_states(model)
        finally:
            model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(flex, ref, rtol=0, atol=1e-5)
