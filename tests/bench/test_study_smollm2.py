"""The SmolLM2 study's smoke run end to end (``--model smollm2 --quick``: 1 step of 2 prompts per arm, HF rollouts,
a 4-prompt evaluation): every job starts from the pretrained model, none from a warm start, and the report pairs
the arms. Several minutes on 2 CPU cores (a model load, a step and an evaluation per arm): runs only with
CIPO_SLOW_TESTS=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.environ.get("CIPO_SLOW_TESTS") != "1",
                                reason="SmolLM2 smoke study: minutes on CPU; set CIPO_SLOW_TESTS=1")

# cipo_verdict joins once the trainer and evaluation pass each attempt's correctness to the template (correct=)
ARMS = ["grpo", "cipo", "cipo_lambda_half", "grpo_matched"]


def test_smollm2_quick_study_runs_every_arm_from_the_pretrained_model(tmp_path: Path) -> None:
    pytest.importorskip("vllm")  # the SmolLM2 config's own engine; the smoke run itself samples with HF
    out, work = tmp_path / "results", tmp_path / "runs"
    args = [sys.executable, "-m", "bench.study", "--model", "smollm2", "--quick", "--arms", ",".join(ARMS),
            "--out", str(out), "--work", str(work)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    study = json.loads((out / "study.json").read_text())
    assert sorted(r["arm"] for r in study["runs"]) == sorted([*ARMS, "pretrained"])  # no warm start job
    assert not (work / "seed0" / "warm_start").exists()
    log = work / "seed0" / "pretrained" / "metrics.jsonl"
    assert not (log.exists() and log.read_text().strip())  # evaluated at step 0, never trained
    for arm in ARMS:
        config = (work / "seed0" / arm / "config.yaml").read_text()
        assert "path: smollm2" in config
        assert len((work / "seed0" / arm / "metrics.jsonl").read_text().splitlines()) == 1
    table = (out / "table.md").read_text()
    assert "same pretrained model" in table and "pretrained model (step 0)" in table
    assert "GRPO, CIPO's samples per step" in table
    assert "CIPO − GRPO, CIPO's samples per step" in table
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stderr.count("(reused)") + again.stdout.count("(reused)") == len(ARMS) + 1
