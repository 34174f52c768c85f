"""Checkpoints are atomic: a crash while writing never loses or corrupts what was already written."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from cipo.trainer import checkpoint as ckpt
from cipo.trainer.prompt_stream import PromptStream


def test_save_load_and_keep(tmp_path: Path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep=2)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_000003.pt"
    assert ckpt.load_checkpoint(latest)["w"].tolist() == [3.0, 3.0, 3.0]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt")) == ["step_000002.pt",
                                                                                    "step_000003.pt"]
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1})

    def exploding_save(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, {"step": 2})
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_000001.pt" and ckpt.load_checkpoint(latest)["step"] == 1
    assert not (tmp_path / "checkpoints" / "step_000002.pt").exists()
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))


def test_dangling_latest_pointer_is_a_clear_error(tmp_path: Path):
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1})
    (tmp_path / "checkpoints" / "step_000001.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match="names step_000001.pt, which is missing"):
        ckpt.latest_checkpoint(tmp_path)


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (random.random(), torch.rand(2).tolist())
    ckpt.set_rng_state(state)
    assert (random.random(), torch.rand(2).tolist()) == a


def test_prompt_stream_resumes_exactly():
    rows = [{"i": i} for i in range(7)]
    straight = PromptStream(rows, seed=3)
    expected = [i for _ in range(5) for i, _ in straight.next_batch(3)]
    first = PromptStream(rows, seed=3)
    got = [i for _ in range(2) for i, _ in first.next_batch(3)]
    resumed = PromptStream(rows, seed=3)
    resumed.load_state_dict(first.state_dict())
    got += [i for _ in range(3) for i, _ in resumed.next_batch(3)]
    assert got == expected
    assert sorted(expected[:7]) == list(range(7))  # an epoch is a permutation
