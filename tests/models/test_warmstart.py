"""Warm start: SFT examples and a few optimizer steps that lower the loss (fast; the accuracy claim is measured
by ``python -m bench.warmstart``, not here)."""

import pytest
import torch

from cipo.data.synthetic import make_dataset, solution_for
from cipo.models.tiny import build_tiny_model, build_tiny_tokenizer
from cipo.warmstart import build_sft_examples, chat_prompt_ids, warm_start


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from threads, and on shared cores 2 threads ran ~5x slower than 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sft_examples():
    tok = build_tiny_tokenizer()
    rows = make_dataset(20, seed=0)
    ex = build_sft_examples(tok, rows)
    assert len(ex) == 20
    prompt, target = ex[0]
    assert prompt == chat_prompt_ids(tok, rows[0]["prompt"])
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert target[-1] == tok.eos_token_id and tok.decode(target[:-1]) == solution_for(rows[0])

    def builder(prompt, attempt):
        return [{"role": "user", "content": prompt[-1]["content"] + "\nAttempt: " + attempt}]

    ex = build_sft_examples(tok, rows, seed=1, correction_builder=builder, correction_fraction=1.0)
    assert len(ex) == 40
    corr = [tok.decode(p) for p, _ in ex[1::2]]
    assert all("Attempt: " in c for c in corr)
    assert any("Attempt: " + solution_for(r) not in c for r, c in zip(rows, corr))  # some attempts are corrupted
    assert all(t == ex[2 * i][1] for i, (_, t) in enumerate(ex[1::2]))  # target: the correct solution


def test_loss_decreases():
    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    model = build_tiny_model(None, tok, seed=0, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=128)
    seen = []
    res = warm_start(model, tok, make_dataset(64, seed=0), steps=25, lr=3e-3, batch_size=8, warmup_steps=5,
                     progress=False, on_step=lambda s, loss: seen.append(s))
    assert res.steps == 25 and len(res.losses) == 25 and seen == list(range(25))
    assert sum(res.losses[-5:]) / 5 < 0.7 * res.losses[0]
    assert not model.training


def test_build_warm_checkpoint_saves_and_reuses(tmp_path):
    from cipo.warmstart import build_warm_checkpoint
    from tests._tiny import load_tiny

    rec = build_warm_checkpoint(tmp_path / "warm", seed=0, max_steps=5, n_train=64, n_check=8, engine_kind="hf",
                                progress=False)
    assert rec["steps"] == 5 and rec["history"] == [] and not rec["reached_target"]  # checks start at step 100
    model, tok = load_tiny(tmp_path / "warm")
    fresh = build_tiny_model(None, tok, seed=0)
    assert not torch.equal(model.lm_head.weight, fresh.lm_head.weight)  # the trained weights were saved
    assert build_warm_checkpoint(tmp_path / "warm", seed=0) == rec  # reused, not rebuilt
