"""Smoke test of ``python -m bench.long_context --quick`` (CI: about half a minute on 2 shared cores): the JSON,
Markdown and PNG are written, every configuration ran and computed the baseline's loss, and the switches act in the
direction the memory model says. Asserts no timings."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._launch import run_quick_benchmark

pytest.importorskip("deepspeed")

@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("long_context")
    return out, run_quick_benchmark("bench.long_context", out, "long_context_cpu-quick")


def test_files_and_rows(quick):
    out, data = quick
    assert (out / "long_context_cpu-quick.md").read_text().startswith("# Long contexts")
    assert (out / "long_context_cpu-quick.png").stat().st_size > 0
    rows = data["rows"]
    assert {r["config"] for r in rows} == {"baseline", "shared_prefix", "tiled_mlp", "checkpointing",
                                          "materialised_loss", "all"}
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert data["check"]["max_relative_grad_norm_difference_vs_baseline"] <= 1e-4
    assert data["check"]["max_abs_loss_difference_vs_baseline"] <= 1e-5
    assert all(r["grad_norm"] > 0 for r in rows)
    assert set(data["predicted_limits"]) == {"24", "48", "80"}


def test_switches_reduce_memory_as_modelled(quick):
    _, data = quick
    by = {(r["config"], r["context"]): r for r in data["rows"]}
    for context in data["workload"]["contexts"]:
        base = by["baseline", context]["peak_extra_bytes"]
        assert by["shared_prefix", context]["tokens_forward"] < by["baseline", context]["tokens_forward"]
        for name in ("shared_prefix", "checkpointing", "all"):
            assert by[name, context]["peak_extra_bytes"] < base, name
        assert by["materialised_loss", context]["peak_extra_bytes"] > base
        for r in (by[name, context] for name in data["configs"]):
            assert 0.3 < r["peak_extra_bytes"] / r["predicted_bytes"] < 3.0, (r["config"], context)
