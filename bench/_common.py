"""Shared helpers of the benchmark suites: environment record, timing, peak memory, deadlines, JSON.

Peak memory
-----------
* CPU: the profiler's memory events (``torch.profiler`` with ``profile_memory=True``): every allocation and free
  made through PyTorch's CPU allocator while the call runs, summed in time order; the peak of that running sum is
  the call's *peak extra memory* (tensors alive before the call do not count; the gradients the call creates do).
  Memory that libraries allocate outside PyTorch's allocator (oneDNN/MKL scratch, the compiler's own heap) is not
  seen. RSS deltas were not used: glibc keeps freed pages, so they mostly measure the allocator's history.
* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory allocated before
  the call (same meaning: caching-allocator bytes handed to tensors, gradients included).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from bench.profiling import cpu_peak_alloc_bytes

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MiB = 2**20
GiB = 2**30


# ----------------------------------------------------------------------------------------------- environment


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed, or no metadata (editable installs without dist-info)
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def mem_total_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) * 1024 / GiB, 1)
    except OSError:
        pass
    return None


def environment(device: torch.device) -> dict[str, Any]:
    """Commit, machine, device and library versions: what a number needs to be reproduced."""
    status = _git("status", "--porcelain")
    lines = status.splitlines() if status else []
    env: dict[str, Any] = {
        # CIPO_BENCH_COMMIT: for a copy of the tree whose .git is not the source's (a lent GPU machine)
        "commit": os.environ.get("CIPO_BENCH_COMMIT") or _git("rev-parse", "HEAD"),
        # the working tree differs from the commit (modified or untracked files): the numbers are of that tree
        "worktree_changes": None if status is None or os.environ.get("CIPO_BENCH_COMMIT") else {
            "modified": sum(not ln.startswith("??") for ln in lines),
            "untracked": sum(ln.startswith("??") for ln in lines)},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": mem_total_gib(),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "device": device_name(device),
        "versions": {
            "torch": torch.__version__,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
            "liger-kernel": _version("liger-kernel"),
            "cut-cross-entropy": _version("cut-cross-entropy"),
            "cipo": _version("cipo"),
        },
        "env": {k: os.environ[k] for k in ("TRITON_INTERPRET", "CIPO_FORCE_TRITON", "OMP_NUM_THREADS")
                if k in os.environ},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / GiB, 1),
                      "sm_count": props.multi_processor_count, "cuda": torch.version.cuda}
    return env


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"CPU: {cpu_model()} ({n} torch thread{'s' if n != 1 else ''})"


# ----------------------------------------------------------------------------------------------- measurement


def apply_thread_setting() -> None:
    """``python -m bench run --threads N`` reaches the section processes as ``CIPO_BENCH_THREADS``."""
    threads = os.environ.get("CIPO_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def cuda_kernel_breakdown(fn: Callable[[], Any], device: torch.device, top: int = 8) -> list[dict[str, Any]]:
    """Device time per kernel of one call of ``fn`` (torch.profiler, CUDA activity): the ``top`` kernels by total
    time, then the rest summed, as ``{"kernel", "calls", "ms"}`` rows. Where the time of a method goes."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None)
        if us is None:
            us = getattr(ev, "self_cuda_time_total", 0.0)
        if us > 0:
            rows.append({"kernel": ev.key[:90], "calls": int(ev.count), "ms": round(us / 1000.0, 3)})
    rows.sort(key=lambda r: -r["ms"])
    rest = rows[top:]
    rows = rows[:top]
    if rest:
        rows.append({"kernel": f"({len(rest)} other kernels)", "calls": sum(r["calls"] for r in rest),
                     "ms": round(sum(r["ms"] for r in rest), 3)})
    return rows


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    return cuda_peak_bytes(fn, device) if device.type == "cuda" else cpu_peak_alloc_bytes(fn)


class Timer:
    """Wall time of a call (device synchronised), plus this process's CPU time (all threads) on CPU runs.

    On a shared CPU machine the wall time grows with other jobs' load; the process CPU time much less so (it still
    grows with cache and memory-bandwidth contention), so both are recorded and the CPU-time ratios are reported
    next to the wall-time ones.
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def add(self, wall: float, cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)

    def run(self, fn: Callable[[], Any], device: torch.device) -> float:
        sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.add(wall, cpu)
        return wall

    def summary(self) -> dict[str, Any]:
        out = summarize(self.wall)
        out["repeats"] = len(self.wall)
        if self.cpu:
            out["cpu_times_s"] = [round(t, 5) for t in self.cpu]
            out["cpu_median_s"] = round(statistics.median(self.cpu), 5)
        return out


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def summarize(times: list[float]) -> dict[str, Any]:
    """Median and spread of repeated runs (IQR from 4 samples on)."""
    if not times:
        return {"times_s": [], "median_s": None, "min_s": None, "max_s": None, "iqr_s": None}
    iqr = None
    if len(times) >= 4:
        q = statistics.quantiles(times, n=4, method="inclusive")
        iqr = q[2] - q[0]
    return {"times_s": [round(t, 5) for t in times], "median_s": round(statistics.median(times), 5),
            "min_s": round(min(times), 5), "max_s": round(max(times), 5),
            "iqr_s": None if iqr is None else round(iqr, 5)}


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError) or isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "CUDA error: out of memory" in text


def failure_status(exc: BaseException, row: dict[str, Any], traceback_limit: int = 0) -> None:
    """Mark a benchmark row that raised: ``"OOM"`` (a measured limit, not an error), or the error and, when
    ``traceback_limit`` > 0, its last frames — so one failing method never hides the others' rows."""
    if is_oom(exc):
        row["status"] = "OOM"
        return
    row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    if traceback_limit:
        import traceback

        row["traceback"] = traceback.format_exc(limit=traceback_limit)


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Deadline:
    """Wall-clock budget of a section: work that would start too late is recorded as skipped."""

    def __init__(self, seconds: Optional[float]) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def allows(self, needed_s: float) -> bool:
        return self.left() > needed_s


def available_ram_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------------------- files


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
