"""A pytest plugin that compiles every Triton kernel launch of a test run for a CUDA target, on a machine
without a GPU: compile errors (API drift between Triton versions, unsupported ops, register/shared-memory
limits that ptxas reports) show up on CPU, before any GPU time is spent.

    env -u TRITON_INTERPRET PYTHONPATH=bench/tools python -m pytest tests/kernels -q -p compile_sm90
    CC_ARCH=90 CC_GPU_BLOCKS=1 ...    # the block/warp configuration CUDA tensors get (default: the CPU blocks)

A fake driver reports an sm_``CC_ARCH`` device; each launch goes through Triton's whole compile chain (to a cubin
with the ptxas in the Triton wheel) with ``warmup=True`` and is never run, so the tests' numerical assertions
fail by design: read only the ``[compile-check]`` summary at the end. Used to check the kernels against Triton 3.6
(the GPU image's) and 3.9: no compile errors on either (2026-11-26).
"""

from __future__ import annotations

import collections
import os
import sys
import traceback

from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

ARCH = int(os.environ.get("CC_ARCH", "90"))
COMPILED: collections.Counter = collections.Counter()
ERRORS: dict[tuple[str, str], str] = {}


class _FakeCudaDriver:
    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", ARCH, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


driver.set_active(_FakeCudaDriver())
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    name = self.fn.__name__
    try:
        kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
        COMPILED[name] += 1
        if kernel is not None and "cubin" not in getattr(kernel, "asm", {}):
            ERRORS.setdefault((name, "no cubin"), f"no cubin: {list(kernel.asm)}")
    except Exception as exc:  # noqa: BLE001 - every compile error is a finding
        message = "".join(traceback.format_exception_only(type(exc), exc))[-3000:]
        if (name, message[:200]) not in ERRORS:
            ERRORS[name, message[:200]] = message
            print(f"\n[compile-check] {name}: {message}", file=sys.stderr)
        COMPILED[name + " FAILED"] += 1


JITFunction.run = _compile_only

# The kernels were built as JITFunctions (interpreter off); the tests skip kernels that do not look interpreted,
# and cipo's dispatch sends CPU tensors to Triton only under TRITON_INTERPRET=1: make both believe it.
import cipo.kernels._fused_epilogue as _epilogue  # noqa: E402
import cipo.kernels.fused_linear_policy_loss as _fused  # noqa: E402
import cipo.kernels.group_advantage  # noqa: E402, F401
import cipo.kernels.linear_logprob as _logprob  # noqa: E402
import cipo.kernels.policy_loss  # noqa: E402, F401

_logprob._check_interpreted = lambda: None
_fused._check_interpreted = lambda: None
JITFunction.__name__ = "InterpretedFunction"
os.environ["TRITON_INTERPRET"] = "1"

if os.environ.get("CC_GPU_BLOCKS") == "1":
    _block_config, _tile_blocks = _logprob._block_config, _epilogue.tile_blocks
    _logprob._block_config = lambda rows, cols, on_gpu: _block_config(rows, cols, True)
    _epilogue.tile_blocks = lambda rows, cols, on_gpu: _tile_blocks(rows, cols, True)


def pytest_terminal_summary(terminalreporter) -> None:
    import triton

    write = terminalreporter.write_line
    write(f"[compile-check] triton {triton.__version__} sm_{ARCH}: launches compiled per kernel: {dict(COMPILED)}")
    write(f"[compile-check] distinct compile errors: {len(ERRORS)}")
    for (name, _), message in ERRORS.items():
        write(f"  {name}: {message}")
