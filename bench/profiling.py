"""Peak CPU memory of a call, shared by the benchmarks and the memory-bound kernel tests."""

from __future__ import annotations

from typing import Any, Callable


def cpu_peak_alloc_bytes(fn: Callable[[], Any]) -> int:
    """Peak of (bytes allocated − bytes freed) by PyTorch's CPU allocator while ``fn`` runs.

    Read from the profiler's memory events, so it counts every tensor the call creates — including ones freed
    before it returns — and nothing allocated before it started. RSS deltas are far too noisy for this.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak
