"""DeepSpeed's long-sequence tools behind cipo's switches, on CPU: TiledMLP, checkpoint offload, the config.

Tolerances: TiledMLP computes the same matrix products on row slices, so in float64 it agrees with the plain MLP
to 1e-12; a whole training step (fp32) to 1e-5 relative (summation order of the weight gradients over slices).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("deepspeed")

from cipo import PolicyLossConfig  # noqa: E402
from cipo.advantages import group_advantages  # noqa: E402
from cipo.models.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from cipo.trainer.backend import PolicyModule, _offloaded_forward  # noqa: E402
from cipo.trainer.config import load_config  # noqa: E402
from cipo.trainer.config_io import ConfigError  # noqa: E402
from cipo.trainer.long_context import (  # noqa: E402
    CheckpointOffload,
    apply_tiled_mlp,
    tiled_mlp_shards,
)
from tests.long_context.test_shared_prefix import mixed_batch  # noqa: E402

RTOL = 1e-5


def tiny(**overrides):
    spec = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=80, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8)
    spec.update(overrides)
    return build_tiny_model(tokenizer=build_tiny_tokenizer(), seed=0, **spec).train()


def test_shard_rule():
    assert tiled_mlp_shards(4096, 2560) == 2  # DeepSpeed's ceil(tokens / hidden)
    assert tiled_mlp_shards(10, 2560) == 1
    assert tiled_mlp_shards(5, 32, shards=8) == 5  # never more slices than tokens
    assert tiled_mlp_shards(0, 32) == 1


@pytest.mark.parametrize("shards,tokens", [(1, 9), (3, 9), (4, 13), (0, 71)])
def test_tiled_mlp_equals_plain_mlp_float64(shards, tokens):
    model = tiny().double()
    mlp = model.model.layers[0].mlp
    plain = copy.deepcopy(mlp)
    assert apply_tiled_mlp(mlp, shards) == 1
    x = torch.randn(1, tokens, 32, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    dy = torch.randn(1, tokens, 32, dtype=torch.float64)
    y = mlp(x)
    y.backward(dy)
    y2 = plain(x2)
    y2.backward(dy)
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    for (name, p), p2 in zip(mlp.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, p2.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_tiled_mlp_really_tiles(monkeypatch):
    """The patched MLP calls TiledMLP with the slice count (so a broken patch cannot pass as the plain MLP)."""
    from deepspeed.runtime.sequence_parallel import ulysses_sp

    calls = []
    original = ulysses_sp.TiledMLP.apply

    def spy(fn, module, x, shards, params):
        calls.append((tuple(x.shape), shards))
        return original(fn, module, x, shards, params)

    monkeypatch.setattr(ulysses_sp.TiledMLP, "apply", spy)
    model = tiny()
    assert apply_tiled_mlp(model, 3) == 2
    assert apply_tiled_mlp(model, 3) == 0  # already patched modules are skipped (no double wrapping)
    model.model(input_ids=torch.arange(11)[None], use_cache=False)
    assert calls == [((1, 11, 32), 3)] * 2


def test_no_gated_mlp_is_an_error():
    with pytest.raises(ValueError, match="no gated MLP"):
        apply_tiled_mlp(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="tiled_mlp_shards"):
        apply_tiled_mlp(tiny(), -1)


def _train_step(model, batch, offload: CheckpointOffload | None = None):
    module = PolicyModule(model)
    model.zero_grad(set_to_none=True)
    adv = group_advantages(batch.reward, batch.group_id)
    cfg = PolicyLossConfig()
    if offload is None:
        loss, _ = module(batch, cfg, advantages=adv)
        loss.backward()
    else:
        loss, _ = _offloaded_forward(offload, module, batch, cfg, {"advantages": adv})
        try:
            loss.backward()
        finally:
            offload.end()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert loss_a == pytest.approx(loss_b, rel=RTOL)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        err = float((grads_a[name] - grads_b[name]).norm() / grads_b[name].norm().clamp_min(1e-30))
        assert err <= RTOL, f"{name}: {err:.2e}"


@pytest.mark.parametrize("ckpt", [False, True])
def test_training_step_with_tiled_mlp_equals_without(ckpt):
    model = tiny()
    tiled = copy.deepcopy(model)
    apply_tiled_mlp(tiled, 4)
    for m in (model, tiled):
        if ckpt:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = mixed_batch(model.config.vocab_size)
    _assert_same(_train_step(tiled, batch), _train_step(model, batch))


def test_checkpoint_offload_runs_on_cpu_and_changes_nothing():
    model = tiny()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = mixed_batch(model.config.vocab_size)
    offload = CheckpointOffload(True)
    with_offload = _train_step(model, batch, offload)
    stats = offload.stats
    assert stats is not None and stats.marked_tensors == model.config.num_hidden_layers  # one input per layer
    assert stats.offloaded_tensors == 0  # DeepSpeed offloads accelerator tensors only: nothing moves on CPU
    _assert_same(with_offload, _train_step(model, batch))
    # the context is closed after the backward: a fresh forward/backward without it works
    _train_step(model, batch)


@pytest.mark.parametrize("override,message", [
    (["actor.shared_prefix=true", "model.attn_implementation=flash_attention_2"], "actor.shared_prefix"),
    (["actor.tiled_mlp_shards=-2"], "actor.tiled_mlp_shards"),
    (["actor.checkpoint_offload=true"], "actor.checkpoint_offload"),
])
def test_config_switches_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)
    ok = load_config(None, ["actor.shared_prefix=true", "actor.tiled_mlp=true", "actor.checkpoint_offload=true",
                            "model.gradient_checkpointing=true", "model.attn_implementation=flex_attention"])
    assert ok.actor.shared_prefix and ok.actor.tiled_mlp and ok.actor.checkpoint_offload
