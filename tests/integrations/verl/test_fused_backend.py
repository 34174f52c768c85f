"""``fused_kernel_options.impl_backend=cipo``: a tiny Qwen3 patched through verl 0.9.1's own
``patch_forward_with_backends`` (as its FSDP engine's ``apply_monkey_patch`` calls it) gives the log-probs, entropy
and gradients of verl's ``torch`` backend — computed by ``cipo.linear_logprob``.

Tolerances (max |difference| over a tensor / max |value| of verl's tensor):

* 1e-6 for log-probs, entropy and the LM-head weight gradient, in float64 and float32 models, and for every
  parameter gradient of the float64 model. verl's backend casts the logits to float32 whatever the model dtype
  (``logits.to(torch.float32)``) and returns float32 log-probs, so ~1e-7 is the floor of any comparison with it
  (measured: 1.3e-7 entropy, 1.6e-7 worst parameter gradient, float64 model).
* 5e-6 for the other parameter gradients of the float32 model: there the body's own float32 backward, fed
  upstream gradients that differ by one float32 ulp, amplifies the difference through cancelling sums (the
  q_norm/k_norm weight gradients): measured 9.6e-7.
"""

from __future__ import annotations

import copy
import functools

import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
from verl.models.transformers import monkey_patch  # noqa: E402
from verl.utils.experimental.torch_functional import FusedLinearForPPO, FusedLinearForPPOFunction  # noqa: E402

import cipo  # noqa: E402
import cipo.integrations.verl as cipo_verl  # noqa: E402
from cipo.models.tiny import build_tiny_model  # noqa: E402

RTOL = 1e-6
RTOL_FP32_BODY = 5e-6
HEAD_OUTPUTS = ("lm_head.weight",)
torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def patched_models(dtype: torch.dtype):
    """Two identical tiny Qwen3s, one patched with verl's torch backend and one with cipo's."""
    torch_model = build_tiny_model(seed=0).to(dtype)
    cipo_model = copy.deepcopy(torch_model)
    # verl patches the *class* forward; the backend is read per instance (model._verl_fused_kernels_backend)
    monkey_patch.patch_forward_with_backends(torch_model, use_fused_kernels=True, fused_kernels_backend="torch")
    monkey_patch.patch_forward_with_backends(cipo_model, use_fused_kernels=True, fused_kernels_backend="cipo")
    return torch_model, cipo_model


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    scale = max(float(theirs.abs().max()), 1e-30)
    err = float((ours.double() - theirs.double()).abs().max()) / scale
    assert err <= rtol, f"{what}: max error {err:.2e} relative to max |value| {scale:.3e}"


def _forward_backward(model, inputs: dict, temperature: float, spy: list | None = None):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, temperature=temperature, return_dict=True, use_cache=False)
    weights = torch.linspace(-1.0, 1.0, out.log_probs.numel()).reshape(out.log_probs.shape)
    loss = (out.log_probs * weights).sum() + 0.3 * (out.entropy * weights.flip(-1)).sum()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.log_probs.detach(), out.entropy.detach(), grads


def _inputs(layout: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if layout == "padded":  # [B, T] without padding-free packing: labels are verl's roll of input_ids
        return {"input_ids": torch.randint(0, 103, (2, 9), generator=g)}
    # verl's remove-padding layout: one packed row, position ids restarting, pre-rolled labels (shift_labels)
    lengths = [5, 8, 3]
    ids = torch.randint(0, 103, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": ids, "position_ids": pos, "shift_labels": torch.roll(ids, -1, dims=-1)}


@pytest.mark.parametrize("dtype,triton", [(torch.float64, False), (torch.float32, False), (torch.float32, True)],
                         ids=["fp64", "fp32", "fp32-triton-interpreted"])  # fp64 never takes the kernels
@pytest.mark.parametrize("layout,temperature", [("padded", 1.0), ("packed", 0.7)])
def test_cipo_backend_equals_verl_torch_backend(dtype, triton, layout, temperature, monkeypatch):
    torch_model, cipo_model = patched_models(dtype)
    assert torch_model._verl_fused_kernels_backend == "torch"
    assert cipo_model._verl_fused_kernels_backend == "cipo"
    if triton:
        monkeypatch.setenv("CIPO_FORCE_TRITON", "1")
    calls = []
    real = cipo.linear_logprob

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(cipo, "linear_logprob", spy)
    inputs = _inputs(layout)
    logp_t, ent_t, grads_t = _forward_backward(torch_model, inputs, temperature)
    assert not calls  # verl's torch backend never reaches cipo
    logp_c, ent_c, grads_c = _forward_backward(cipo_model, inputs, temperature)
    assert len(calls) == 1  # cipo's backend computed the log-probs

    assert logp_c.dtype == logp_t.dtype == torch.float32 and logp_c.shape == logp_t.shape
    assert ent_c.dtype == ent_t.dtype and ent_c.shape == ent_t.shape
    _assert_close(logp_c, logp_t, "log_probs")
    _assert_close(ent_c, ent_t, "entropy")
    assert set(grads_c) == set(grads_t) and "lm_head.weight" in grads_c and "model.embed_tokens.weight" in grads_c
    for name in grads_t:
        body = dtype == torch.float32 and name not in HEAD_OUTPUTS
        _assert_close(grads_c[name], grads_t[name], f"grad {name}", RTOL_FP32_BODY if body else RTOL)


def test_other_backends_untouched():
    """verl's own backend names still reach verl's code: the wrappers only intercept "cipo"."""
    assert FusedLinearForPPO.forward.__wrapped__.__module__ == "verl.utils.experimental.torch_functional"
    assert monkey_patch.patch_forward_with_backends.__wrapped__.__module__ == "verl.models.transformers.monkey_patch"
    g = torch.Generator().manual_seed(2)
    h = torch.randn(6, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    ids = torch.randint(0, 40, (6,), generator=g)
    ours = FusedLinearForPPO(impl_backend="torch")(h, w, ids, 0.8)
    theirs = FusedLinearForPPOFunction.apply(h, w, ids, 0.8, 512)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="Unsupported FusedLinearForPPO backend"):
        FusedLinearForPPO(impl_backend="nonsense")
    assert FusedLinearForPPO(impl_backend="cipo").impl_backend == "cipo"


def test_unknown_backend_still_skipped_by_verl(capsys):
    model = build_tiny_model(seed=0)
    before = type(model).forward
    monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="nonsense")
    assert "Skipping monkey patch" in capsys.readouterr().out
    assert type(model).forward is before and not hasattr(model, "_verl_fused_kernels_backend")


def test_fused_function_contract():
    """[B, T, H] in, [B, T] out; bf16 hidden gives bf16 entropy and fp32 log-probs, as verl's torch backend."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 3, 16, generator=g).to(torch.bfloat16)
    w = torch.randn(40, 16, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 40, (2, 3), generator=g)
    logp, ent = cipo_verl.fused_linear_for_ppo(h, w, ids, 1.0)
    logp_v, ent_v = FusedLinearForPPO(impl_backend="torch")(h, w, ids, 1.0)
    assert logp.shape == ent.shape == (2, 3)
    assert (logp.dtype, ent.dtype) == (logp_v.dtype, ent_v.dtype) == (torch.float32, torch.bfloat16)
    torch.testing.assert_close(logp, logp_v, rtol=2e-2, atol=2e-2)  # verl rounds the bf16 logits, cipo does not
    with pytest.raises(ValueError, match="must match hidden_states shape"):
        cipo_verl.fused_linear_for_ppo(h, w, ids[:, :2], 1.0)
