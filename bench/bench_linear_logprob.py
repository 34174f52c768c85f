"""CPU benchmark of ``linear_logprob``: tiled torch path vs naive torch (full fp32 logits + log_softmax + gather).

Measures forward+backward wall time (median of repeats) and peak extra CPU memory (from the profiler's memory
events) for each variant in the same run, and prints ratios vs the naive baseline.

    python bench/bench_linear_logprob.py            # T=8192, H=256, V=32000, 5 timed repeats
    python bench/bench_linear_logprob.py --quick    # same shape, one run per variant, timed while profiled

Needs the package importable as ``cipo`` (``pip install -e .``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

os.environ.setdefault("CIPO_FORCE_TRITON", "0")  # the CPU path, not the Triton interpreter

import torch  # noqa: E402
from cipo.kernels.linear_logprob import linear_logprob  # noqa: E402
from cipo.kernels.linear_logprob_ref import linear_logprob_reference  # noqa: E402

from cipo.profiling import cpu_peak_alloc_bytes  # noqa: E402


def median_seconds(fn: Callable[[], None], repeats: int, reset: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        reset()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one run per variant: no warm-up, timed while profiled")
    parser.add_argument("--entropy", action="store_true", help="also return (and differentiate) the entropy")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats

    torch.manual_seed(0)
    T, H, V = args.tokens, args.hidden, args.vocab
    hidden = torch.randn(T, H, requires_grad=True)
    weight = (torch.randn(V, H) / H**0.5).requires_grad_(True)
    targets = torch.randint(0, V, (T,))

    def step(fn: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
        def run() -> None:
            out = fn(hidden, weight, targets, 1.0, args.entropy)
            loss = out[0].sum() + out[1].sum() if args.entropy else out.sum()
            loss.backward()

        return run

    def reset() -> None:  # outside timing and profiling: each run's peak includes the gradients it allocates
        hidden.grad = weight.grad = None

    variants = {"naive fp32": step(linear_logprob_reference), "tiled (cpu path)": step(linear_logprob)}
    results = {}
    for name, run in variants.items():
        if args.quick:  # the profiler adds little to a handful of large ops: time the profiled run itself
            reset()
            t0 = time.perf_counter()
            peak = cpu_peak_alloc_bytes(run)
            seconds = time.perf_counter() - t0
        else:
            reset()
            run()  # warm-up
            seconds = median_seconds(run, repeats, reset)
            reset()
            peak = cpu_peak_alloc_bytes(run)
        results[name] = (seconds, peak)

    base_s, base_mem = results["naive fp32"]
    print(f"linear_logprob fwd+bwd, CPU, T={T} H={H} V={V}, fp32, entropy={args.entropy}, "
          f"{torch.get_num_threads()} threads, median of {repeats}")  # fmt: skip
    print(f"{'variant':<18} {'time [s]':>9} {'vs naive':>9} {'peak extra [MiB]':>17} {'vs naive':>9}")
    for name, (seconds, peak) in results.items():
        print(f"{name:<18} {seconds:>9.2f} {seconds / base_s:>8.2f}x {peak / 2**20:>17.0f} {peak / base_mem:>8.2f}x")
    print(f"(full fp32 logits alone: {T * V * 4 / 2**20:.0f} MiB; peak includes the gradients dH, dW: "
          f"{(T * H + V * H) * 4 / 2**20:.0f} MiB)")  # fmt: skip


if __name__ == "__main__":
    main()
