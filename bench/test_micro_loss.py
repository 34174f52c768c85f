"""pytest-benchmark micro-benchmarks of the loss pieces on small CPU shapes (not collected by ``pytest tests``).

    pytest bench --benchmark-only                      # all micro-benchmarks
    pytest bench --benchmark-only --benchmark-json=bench/results/micro.json

Each benchmark runs one forward + backward (or one call) per round; the same-shape naive baseline is a
parametrisation of the same test, so ``--benchmark-compare`` / the group table put them side by side.
"""

from __future__ import annotations

import os

os.environ.setdefault("CIPO_FORCE_TRITON", "0")  # the CPU (torch) paths, not the Triton interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("pytest_benchmark")

from bench.loss_suite import CONFIG, LAMBDA_CORR, Shape, build, make_workload  # noqa: E402
from cipo.advantages import group_advantages  # noqa: E402
from cipo.loss import cipo_policy_loss  # noqa: E402

SHAPE = Shape(1024, 128, 8192, seq_len=128)


@pytest.fixture(scope="module")
def workload():
    return make_workload(SHAPE, torch.device("cpu"))


@pytest.mark.benchmark(group="lm-head + policy loss fwd+bwd, T=1024 H=128 V=8192 fp32")
@pytest.mark.parametrize("method", ["naive", "linear_logprob", "fused", "fused_token", "fused_vocab", "matmul"])
def test_loss_fwd_bwd(benchmark, workload, method: str) -> None:
    step = build(method, workload)

    def run() -> None:
        workload.reset()
        step()

    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    assert workload.hidden.grad is not None


@pytest.mark.benchmark(group="policy loss from logp (no LM head), T=1024")
def test_cipo_policy_loss_from_logp(benchmark, workload) -> None:
    logp = workload.batch.old_logp.clone().requires_grad_(True)

    def run() -> None:
        logp.grad = None
        loss, _ = cipo_policy_loss(logp, workload.batch, CONFIG, lambda_corr=LAMBDA_CORR)
        loss.backward()

    benchmark.pedantic(run, rounds=20, warmup_rounds=2, iterations=1)


@pytest.mark.benchmark(group="group advantages, 4096 sequences")
def test_group_advantages(benchmark) -> None:
    gen = torch.Generator().manual_seed(0)
    reward = (torch.rand(4096, generator=gen) < 0.5).float()
    group = torch.arange(4096) // 8
    benchmark(group_advantages, reward, group)
