"""Smoke test of the benchmark suites: they run end to end and write their reports. No timing assertions.

* the CPU suite in ``--quick`` mode, minus the slowest baselines (``torch.compile``, Liger, CCE: each is a C++
  compile or a long chunked loop on CPU; the full quick suite runs them) and with a small verifier batch;
* the GPU suite's loss plan, shrunk and run on the CPU, so the code that only runs on the GPU machine is exercised.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_quick_cpu_suite_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    _run(["run", "--suite", "cpu", "--quick", "--out", str(tmp_path), "--skip", "compile,liger_grpo,cce",
          "--verifier-size", "200,20", "--budget-s", "200"], timeout=330)
    data = json.loads((tmp_path / "cpu-quick.json").read_text())
    assert data["suite"] == "cpu" and data["quick"] is True
    assert data["env"]["versions"]["torch"] and "commit" in data["env"]
    assert set(data["sections"]) == {"loss", "trainer", "verifiers"}
    loss = data["sections"]["loss"]
    assert "status" not in loss, loss.get("status")
    rows = {r["method"]: r for r in loss["shapes"][0]["rows"]}
    for method in ("naive", "linear_logprob", "fused", "matmul"):
        assert rows[method]["status"] == "ok", rows[method]
        assert rows[method]["median_s"] > 0 and rows[method]["peak_extra_bytes"] > 0
    for method in ("compile", "liger_grpo", "cce"):
        assert method not in rows  # left out on request
    assert rows["fused"]["time_vs_naive"] > 0 and rows["fused"]["memory_vs_naive"] > 0
    errors = {r["method"]: r for r in loss["error"]["rows"]}
    assert errors["fused"]["status"] == "ok" and errors["fused"]["dH_rel"] < 1e-3
    trainer = data["sections"]["trainer"]
    assert {(r["fused"], r["checkpointing"]) for r in trainer["rows"] if r["status"] == "ok"} == {
        (True, True), (True, False), (False, True), (False, False)}
    verifiers = data["sections"]["verifiers"]  # (its 5-point sanity band is too tight for 200 items: not checked)
    assert [(r["verifier"], r["workers"]) for r in verifiers["rows"]] == [("math", 1), ("math", 2), ("code", 1),
                                                                          ("code", 2)]
    assert all(r["per_s"] > 0 and 0 < r["mean_score"] < 1 for r in verifiers["rows"])
    md = (tmp_path / "cpu-quick.md").read_text()
    assert "| method | fwd+bwd median |" in md and "Error vs float64" in md and "## Verifiers" in md
    assert data["command"] in md
    for png in ("cpu-quick_loss.png", "cpu-quick_trainer.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_gpu_plan_runs_shrunk_on_cpu(tmp_path: Path) -> None:
    _run(["run", "--suite", "gpu", "--quick", "--device", "cpu", "--shrink", "64", "--sections", "loss",
          "--skip", "compile,liger_grpo,cce", "--out", str(tmp_path), "--budget-s", "120"], timeout=240)
    data = json.loads((tmp_path / "gpu-quick.json").read_text())
    shape = data["sections"]["loss"]["shapes"][0]
    assert shape["shape"]["tag"] == "issue-3" and shape["shape"]["dtype"] == "bfloat16"
    rows = {r["method"]: r for r in shape["rows"]}
    assert rows["matmul"]["status"] == "ok" and rows["fused"]["time_vs_matmul"] > 0
    # Liger's fused linear CE is CUDA-only; without the `bench` extra it is not even importable.
    assert rows["liger_flce"]["status"].startswith(("n/a on CPU", "skipped: liger-kernel not importable"))
    md = (tmp_path / "gpu-quick.md").read_text()
    assert "Issue-3 targets" in md
    out = _run(["summary", str(tmp_path / "gpu-quick.json")], timeout=60).stdout
    assert "fused / matmul" in out
