"""Smoke test of ``python -m bench.ulysses --quick`` (2 ranks over gloo; ~20 s): the JSON and Markdown are
written, every row ran, the 2-rank steps compute the one-process steps, and sequence parallelism lowers the
baseline's peak per rank. Asserts no timings."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._launch import run_quick_benchmark

pytest.importorskip("deepspeed")

@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ulysses")
    return out, run_quick_benchmark("bench.ulysses", out, "ulysses_cpu-quick")


def test_rows_and_the_same_step(quick):
    out, data = quick
    assert (out / "ulysses_cpu-quick.md").read_text().startswith("# Ulysses sequence parallelism")
    rows = data["rows"]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert {(r["config"], r["sp"]) for r in rows} == {(c, sp) for c in ("baseline", "checkpointing", "all")
                                                      for sp in (1, 2)}
    assert all(r["grad_norm"] > 0 and len(r["peak_per_rank"]) == 2 for r in rows)
    assert data["check"]["max_relative_grad_norm_difference_vs_one_process"] <= 1e-5
    assert data["check"]["max_abs_loss_difference_vs_one_process"] <= 1e-6


def test_sequence_parallelism_lowers_the_peak_per_rank(quick):
    _, data = quick
    by = {(r["config"], r["sp"], r["context"]): r for r in data["rows"]}
    for context in data["workload"]["contexts"]:
        one, two = by["baseline", 1, context], by["baseline", 2, context]
        assert two["peak_extra_bytes"] < one["peak_extra_bytes"]
        assert two["predicted_bytes"] < one["predicted_bytes"]
