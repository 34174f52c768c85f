"""The study end to end in ``--quick`` mode — warm start, GRPO and CIPO arms, ``cipo eval`` of each,
the report — plus its statistics: the t-based 95 % CI and the paired differences to GRPO."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.study import aggregate, mean_ci, t_quantile

REPO = Path(__file__).resolve().parents[2]


def test_mean_ci_known_values() -> None:
    stat = mean_ci([1.0, 2.0, 3.0])
    assert stat["mean"] == pytest.approx(2.0) and stat["sd"] == pytest.approx(1.0)
    assert stat["ci95"] == pytest.approx(4.303 / math.sqrt(3))
    assert t_quantile(1) == pytest.approx(12.706) and t_quantile(1000) == pytest.approx(1.96)
    one = mean_ci([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["ci95"])
    assert mean_ci([math.nan, 0.25, 0.75])["n"] == 2


def test_paired_differences_use_matching_seeds() -> None:
    def record(arm: str, seed: int, acc: float) -> dict:
        return {"spec": {"arm": arm, "seed": seed},
                "eval": {"accuracy": acc, "pass_at_k": {"1": acc}, "correction_success": 0.1, "regression_rate": 0.2}}

    records = [record("grpo", 0, 0.5), record("grpo", 1, 0.6), record("grpo", 2, 0.9),
               record("cipo", 0, 0.6), record("cipo", 1, 0.7)]  # seed 2 of cipo missing: pairs over seeds 0, 1
    agg = aggregate(records, ["grpo", "cipo"])
    diff = agg["paired_vs_grpo"]["cipo"]["accuracy"]
    assert diff["n"] == 2 and diff["mean"] == pytest.approx(0.1) and diff["sd"] == pytest.approx(0.0, abs=1e-12)
    assert agg["arms"]["grpo"]["accuracy"]["mean"] == pytest.approx(2 / 3)


def test_quick_study_writes_table_curves_and_commands(tmp_path: Path) -> None:
    out, work = tmp_path / "results", tmp_path / "runs"
    args = [sys.executable, "-m", "bench.study", "--quick", "--out", str(out), "--work", str(work)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    study = json.loads((out / "study.json").read_text())
    assert sorted((r["arm"], r["seed"]) for r in study["runs"]) == [("cipo", 0), ("grpo", 0), ("warm_start", 0)]
    for run in study["runs"]:
        for name in ("accuracy", "pass@1", "pass@4", "correction_success"):
            value = run["metrics"][name]
            assert math.isnan(value) or 0.0 <= value <= 1.0, (run["arm"], name, value)
        assert run["metrics"]["pass@1"] == pytest.approx(run["metrics"]["accuracy"])
        assert (Path(run["run_dir"]) / "eval" / "eval.json").exists()
    cipo_run = work / "seed0" / "cipo"
    lines = (cipo_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "corr/success" in json.loads(lines[-1])
    grpo_line = json.loads((work / "seed0" / "grpo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "corr/success" not in grpo_line  # the GRPO arm really has no correction stream
    # both arms start from the seed's one warm start
    for arm in ("grpo", "cipo"):
        config = (work / "seed0" / arm / "config.yaml").read_text()
        assert str(work / "seed0" / "warm_start" / "init_model") in config
    table = (out / "table.md").read_text()
    assert "| CIPO |" in table and "| GRPO (no correction stream) |" in table and "arm − GRPO" in table
    commands = (out / "commands.md").read_text()
    assert "python -m bench.study --quick" in commands
    assert "cipo train" in commands and "cipo eval --run-dir" in commands
    for name in ("curves.png", "pass_at_k.png"):
        assert (out / name).stat().st_size > 0
    # a second call reuses every finished job
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stderr.count("(reused)") + again.stdout.count("(reused)") == 3


def test_classify_failure_finds_the_first_fault() -> None:
    from bench.study import classify_failure
    from cipo.data import synthetic

    row = synthetic.problem_to_row({"expr": "47+85", "answer": 132, "operands": [47, 85], "op": "+",
                                    "solution": synthetic.addition_solution([47, 85])}, 0, "test",
                                   synthetic.Difficulty())
    cases = {
        "7+5=12 4+8+1=13 \\boxed{132}": "correct",
        "7+5=12 4+8=12 \\boxed{122}": "dropped/extra carry",
        "7+5=11 4+8+1=13 \\boxed{131}": "miscomputed column sum",
        "7+6=13 4+8+1=13 \\boxed{133}": "misread operand digit",
        "7+5=12 4+8+1=13 \\boxed{133}": "boxed answer disagrees with columns",
        "7+5=12 \\boxed{12}": "wrong column count",
        "the answer is 132": "format",
    }
    for text, expected in cases.items():
        assert classify_failure(text, row) == expected, text
