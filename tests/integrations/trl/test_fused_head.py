"""cipo's fused LM head against TRL 1.16's ``add_fused_lm_head`` on the same model: outputs, zeros, gradients."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from cipo.integrations.trl import add_cipo_fused_lm_head  # noqa: E402


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 103, (3, 12), generator=g)
    attention = torch.ones_like(ids)
    attention[0, :3] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :5] = -100
    return ids, attention, labels


def _run(model, patch, call_kwargs, seed=1):
    model = copy.deepcopy(model)
    patch(model)
    out = model(**call_kwargs, fused_lm_head=True)
    g = torch.Generator().manual_seed(seed)
    weight_lp = torch.randn(out.log_probs.shape, generator=g)
    weight_ent = torch.randn(out.log_probs.shape, generator=g)
    (out.log_probs * weight_lp + out.entropy * weight_ent).sum().add(out.loss).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("shifted,triton", [(False, False), (True, False), (False, True)])
def test_head_matches_trl(base_model, monkeypatch, shifted, triton):
    """``triton``: cipo's Triton kernel (the CUDA path; the interpreter on CPU) instead of its torch path."""
    ids, attention, labels = _inputs()
    call = dict(input_ids=ids, attention_mask=attention)
    if shifted:  # context/sequence parallelism hands pre-shifted labels
        call["shift_labels"] = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    else:
        call["labels"] = labels
    outputs = ("log_probs", "entropy")
    want, want_g = _run(base_model, lambda m: add_fused_lm_head(m, temperature=0.7, outputs=outputs), call)
    if triton:
        monkeypatch.setenv("CIPO_FORCE_TRITON", "1")
    # on top of TRL's patch, as CipoGRPOTrainer does it
    got, got_g = _run(base_model, lambda m: (add_fused_lm_head(m, temperature=0.7, outputs=outputs),
                                             add_cipo_fused_lm_head(m, temperature=0.7, outputs=outputs)), call)
    assert got.log_probs.shape == want.log_probs.shape == (3, 12 if shifted else 11)
    assert torch.equal(got.label_mask, want.label_mask)
    assert torch.equal(got.log_probs == 0, want.log_probs == 0)  # zeros exactly where the label is ignored
    torch.testing.assert_close(got.log_probs, want.log_probs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=0)
    assert set(got_g) == set(want_g)
    for name, g in want_g.items():
        assert float((got_g[name] - g).norm() / g.norm()) <= 1e-5, name


def test_plain_calls_and_generation_are_untouched(base_model):
    ids, attention, _ = _inputs()
    model = copy.deepcopy(base_model)
    add_cipo_fused_lm_head(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=attention).logits,
                               base_model(input_ids=ids, attention_mask=attention).logits, rtol=0, atol=0)
    torch.manual_seed(0)
    a = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    b = base_model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


def test_all_ignored_labels_give_a_zero_gradient(base_model):
    ids, attention, labels = _inputs()
    model = copy.deepcopy(base_model)
    add_cipo_fused_lm_head(model, outputs=("log_probs", "entropy"))
    out = model(input_ids=ids, attention_mask=attention, labels=torch.full_like(labels, -100), fused_lm_head=True)
    assert not out.label_mask.any() and torch.count_nonzero(out.log_probs) == 0
    out.log_probs.sum().backward()  # attached to the graph: no error
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_unsupported_models_are_refused(base_model):
    model = copy.deepcopy(base_model)
    with pytest.raises(ValueError, match="is_top1"):
        add_cipo_fused_lm_head(model, outputs=("log_probs", "is_top1"))
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        add_cipo_fused_lm_head(model)
