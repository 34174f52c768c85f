"""Benchmark of ``fused_linear_policy_loss`` (CPU by default) against the naive torch path, in the same run.

Variants (fwd+bwd of the CIPO loss on one packed batch; on CPU fp32 and the torch epilogues):

* ``naive fp32`` — the baseline: full ``[T, V]`` fp32 logits, ``log_softmax``, gather, ``cipo_policy_loss``,
  autograd backward (what an unfused trainer does);
* ``linear_logprob + loss`` — the unfused chunked path: ``linear_logprob`` (8·THV, no ``[T, V]``) then
  ``cipo_policy_loss`` and autograd;
* ``fused token chunks`` — 6·THV, gradient finished in the forward (the automatic choice at this shape);
* ``fused vocab slabs`` — 8·THV, small accumulator.

Reports the median wall time and CPU time of the process (robust to other load on a shared machine; the timed
repeats also go round-robin over the variants), the peak extra memory (CPU: profiler memory events; CUDA: the
allocator's peak; gradients included) and ratios vs the first variant (the naive path); prints a Markdown table
and writes JSON to ``bench/results/fused_loss_<device>.json``.

    python bench/bench_fused_loss.py            # T=8192, H=256, V=32000: warm-up + 3 timed rounds (~3-4 min)
    python bench/bench_fused_loss.py --quick    # T=4096 unless --tokens: one profiled run per variant (< 1 min)
    # GPU session (adds the bare LM-head matmul fwd+bwd, the target's yardstick; Triton epilogues, cuBLAS):
    python bench/bench_fused_loss.py --device cuda --dtype bfloat16 --tokens 8192 --hidden 4096 --vocab 151936 \\
        --skip-naive

The batch: ``T / seq_len`` sequences, half base and half correction stream, groups of 8, prompts of
``--prompt-len`` tokens (1 by default: nearly every row is a loss row, so every variant does the same FLOPs; the
fused path drops non-loss rows, so longer prompts favour it further).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("CIPO_FORCE_TRITON", "0")  # the CPU path, not the Triton interpreter

import torch  # noqa: E402
from cipo.kernels.fused_linear_policy_loss import fused_linear_policy_loss  # noqa: E402
from cipo.kernels.linear_logprob import linear_logprob  # noqa: E402

from cipo.config import PolicyLossConfig  # noqa: E402  (submodules: works however `cipo` is put on the path)
from cipo.loss import cipo_policy_loss  # noqa: E402
from cipo.packing import PackedBatch, SequenceSample  # noqa: E402
from cipo.profiling import cpu_peak_alloc_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fused_loss_cpu.json"


def make_batch(T: int, V: int, seq_len: int, prompt_len: int, seed: int = 0) -> PackedBatch:
    """``T / seq_len`` sequences with old/rollout log-probs near a plausible value; both streams."""
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(T // seq_len):
        response = seq_len - prompt_len
        old = (-3.0 * torch.rand(response, generator=gen)).tolist()
        seqs.append(SequenceSample(
            torch.randint(0, V, (prompt_len,), generator=gen), torch.randint(0, V, (response,), generator=gen),
            reward=float(torch.rand((), generator=gen) < 0.5), group_id=i // 8, stream=(i // 8) % 2,
            old_logp=old, rollout_logp=old,
        ))  # fmt: skip
    return PackedBatch.from_sequences(seqs)


def timed(run: Callable[[], None], reset: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one ``run``."""
    reset()
    if device.type == "cuda":
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - w0, time.process_time() - c0


def peak_extra_bytes(run: Callable[[], None], reset: Callable[[], None], device: torch.device) -> int:
    """Peak extra memory of one ``run``: CPU — profiler memory events; CUDA — the allocator's peak."""
    reset()
    if device.type != "cuda":
        return cpu_peak_alloc_bytes(run)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure_all(variants: dict[str, Callable[[], None]], reset: Callable[[], None], device: torch.device,
                repeats: int, quick: bool) -> list[dict]:
    """Median wall and CPU time and peak extra memory per variant. The timed repeats go round-robin over the
    variants, so that load from other processes on a shared machine hits all of them alike; ``quick``: one
    profiled run each, timed as it runs."""
    names = list(variants)
    walls: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, int] = {}
    if quick and device.type != "cuda":
        for n in names:
            reset()
            w0, c0 = time.perf_counter(), time.process_time()
            peaks[n] = cpu_peak_alloc_bytes(variants[n])
            walls[n].append(time.perf_counter() - w0)
            cpus[n].append(time.process_time() - c0)
    else:
        for n in names:
            timed(variants[n], reset, device)  # warm-up (allocator, Triton compilation, cuBLAS heuristics)
        for _ in range(repeats):
            for n in names:
                w, c = timed(variants[n], reset, device)
                walls[n].append(w)
                cpus[n].append(c)
        for n in names:
            peaks[n] = peak_extra_bytes(variants[n], reset, device)
    return [{"variant": n, "seconds": round(statistics.median(walls[n]), 5),
             "cpu_seconds": round(statistics.median(cpus[n]), 5), "peak_extra_mib": round(peaks[n] / 2**20, 1)}
            for n in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="default 8192 (4096 with --quick)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run per variant, timed while profiled")
    parser.add_argument("--device", default="cpu", help="cpu (the torch path) or cuda (Triton epilogues, cuBLAS)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--skip-naive", action="store_true", help="leave out the [T, V] baselines (large shapes)")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/fused_loss_<device>.json")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    if args.tokens is None:
        args.tokens = 4096 if args.quick else 8192
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    out = args.out or RESULTS.with_name(f"fused_loss_{device.type}.json")

    torch.manual_seed(0)
    T, H, V = args.tokens, args.hidden, args.vocab
    batch = make_batch(T, V, args.seq_len, args.prompt_len).to(device)
    config = PolicyLossConfig(clip_ratio_high=0.28, tis_mode="token")
    kwargs = dict(lambda_corr=0.5)
    hidden = torch.randn(batch.num_tokens, H, device=device).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype).requires_grad_(True)
    targets = batch.targets
    def bare_matmul() -> None:  # the floor the GPU target is stated against: logits = h @ W.T, fwd + bwd
        logits = hidden @ weight.t()
        logits.backward(logits.detach())  # any [T, V] upstream gradient: same GEMMs

    def naive() -> None:
        logits = (hidden @ weight.t()).float() / config.temperature
        logp = torch.log_softmax(logits, dim=-1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
        logp = torch.where(targets != -100, logp, 0.0)
        loss, _ = cipo_policy_loss(logp, batch, config, **kwargs)
        loss.backward()

    def unfused_chunked() -> None:
        logp, ent = linear_logprob(hidden, weight, targets, config.temperature, True)
        loss, _ = cipo_policy_loss(logp, batch, config, entropy=ent, **kwargs)
        loss.backward()

    def fused(tiling: str) -> Callable[[], None]:
        def run() -> None:
            loss, _ = fused_linear_policy_loss(hidden, weight, batch, config, tiling=tiling, **kwargs)
            loss.backward()

        return run

    def reset() -> None:  # outside timing and profiling: each run's peak includes the gradients it allocates
        hidden.grad = weight.grad = None

    variants: dict[str, Callable[[], None]] = {}
    if not args.skip_naive:
        variants["naive fp32"] = naive
    if device.type == "cuda":
        variants["bare LM-head matmul"] = bare_matmul
    variants.update({
        "linear_logprob + loss": unfused_chunked,
        "fused token chunks": fused("token"),
        "fused vocab slabs": fused("vocab"),
    })  # fmt: skip
    rows = measure_all(variants, reset, device, repeats, args.quick)

    base = rows[0]
    for row in rows:
        row["time_vs_first"] = round(row["seconds"] / base["seconds"], 3)
        row["cpu_time_vs_first"] = round(row["cpu_seconds"] / base["cpu_seconds"], 3)
        row["memory_vs_first"] = round(row["peak_extra_mib"] / max(base["peak_extra_mib"], 1e-9), 3)
    loss_rows = int(batch.loss_mask.sum())
    where = f"{torch.get_num_threads()} CPU threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    header = (f"fused_linear_policy_loss fwd+bwd, {device.type}, T={batch.num_tokens} ({loss_rows} loss rows) H={H} "
              f"V={V}, {args.dtype}, {where}, median of {repeats}")  # fmt: skip
    print(header)
    print()
    vs = f"vs {base['variant']}"
    print(f"| variant | wall [s] | {vs} | CPU time [s] | {vs} | peak extra [MiB] | {vs} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['seconds']:.3f} | {r['time_vs_first']:.2f}x | {r['cpu_seconds']:.2f} | "
              f"{r['cpu_time_vs_first']:.2f}x | {r['peak_extra_mib']:.0f} | {r['memory_vs_first']:.3f}x |")
    print()
    itemsize = torch.finfo(dtype).bits // 8
    print(f"(full fp32 logits alone: {T * V * 4 / 2**20:.0f} MiB; the peaks include the gradients dH, dW: "
          f"{(T * H + V * H) * itemsize / 2**20:.0f} MiB)")  # fmt: skip
    result = {
        "quick": args.quick, "device": where, "tokens": batch.num_tokens, "loss_rows": loss_rows, "hidden": H,
        "vocab": V, "dtype": args.dtype, "repeats": repeats, "rows": rows,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
