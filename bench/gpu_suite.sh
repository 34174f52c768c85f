#!/usr/bin/env bash
# The GPU suite in one command, for a CUDA machine with no network (PyTorch and Triton installed; anything else
# travels as wheels in bench/wheels). Run from the repository root:
#
#     OUT=/path/to/results bash bench/gpu_suite.sh        # default OUT: bench/results/gpu
#
# 1. installs Liger-Kernel and Cut Cross-Entropy from bench/wheels (pip --no-index --no-deps, else unpacked onto
#    PYTHONPATH; the baselines are recorded as skipped when the wheels are absent) and cipo itself (pip install
#    --no-deps --no-build-isolation -e ., else cipo/kernels -> ../kernels in this checkout);
# 2. runs the kernel tests on the GPU with real Triton compilation (TRITON_INTERPRET=0; their bf16 and fp32 cases);
# 3. times, in one process per section: fused_linear_policy_loss vs naive torch (fp32 logits materialised, verl's
#    default) vs the bare LM-head matmul forward+backward [+ linear_logprob, Liger GRPO, Liger FLCE, CCE] at
#    T ∈ {8192, 32768}, H ∈ {2560, 4096}, V = 151936, bf16 (and fp32 at T=8192, H=4096), error vs float64; then the
#    tiling study (token chunks of 384…2048 rows, fp32 or weight-dtype dW sum, vs vocab
#    slabs: the evidence for the automatic rule); then a training step of a Qwen3-4B-shaped model (longest context that fits, fused loss on/off, checkpointing on/off);
#    then the T sweep 1k…32k × V ∈ {32000, 151936} with every baseline, as far as the time budget goes;
# 4. prints the target table last and leaves in $OUT: gpu_suite.log, kernel_tests.txt, gpu.json, gpu.md, gpu_loss.png,
#    gpu_trainer.png.
#
# Everything runs under `timeout`s that keep the total under GPU_SUITE_BUDGET_S (default 470 s < 8 min).
# GPU_SUITE_SECTIONS (e.g. loss,loss_tiling) and GPU_SUITE_SKIP (e.g. liger_grpo,cce) narrow the timing suite for a
# shorter re-check; CIPO_BENCH_COMMIT records the commit when the checkout's .git is not the source's.
# GPU_SUITE_TEST_ON_CPU=1 runs the same stages on a machine without a GPU (the plan shrunk onto the CPU) to test
# this script; its numbers mean nothing.
# Targets (docs/BENCHMARKS.md; reported, not asserted): fused fwd+bwd ≤ 1.15× the bare matmul fwd+bwd of the same
# run; extra memory beyond the gradients ≤ 1.5 GiB; logp error vs float64 no worse than torch's bf16 path.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_SUITE_BUDGET_S:-470}
TEST_TIMEOUT=${GPU_SUITE_TEST_TIMEOUT_S:-170}
exec > >(tee -a "$OUT/gpu_suite.log") 2>&1
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 CIPO_FORCE_TRITON=0
SECONDS=0
left() { echo $(( BUDGET - SECONDS )); }
stage() { echo; echo "=== [$(printf '%3d' "$SECONDS") s] $*"; }

stage "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | head -3
timeout 60 "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:  # noqa: BLE001
    print("triton: not importable:", exc)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1), "GiB")
EOF
BENCH_ARGS=()
SKIP=${GPU_SUITE_SKIP:-}
if [ "${GPU_SUITE_TEST_ON_CPU:-0}" = 1 ]; then
    # Testing this script on a machine without a GPU: the same stages, the GPU plan shrunk onto the CPU.
    echo "gpu_suite: GPU_SUITE_TEST_ON_CPU=1: running the GPU plan shrunk on the CPU (numbers meaningless)"
    export TRITON_INTERPRET=1
    BENCH_ARGS=(--quick --device cpu --shrink 64)
    SKIP="compile,cce,liger_grpo${SKIP:+,$SKIP}"
elif ! timeout 30 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: no CUDA device visible to torch; nothing to run"; exit 2
fi

stage "install baselines from bench/wheels (offline)"
shopt -s nullglob
wheels=(bench/wheels/*.whl)
if (( ${#wheels[@]} )); then
    ls -l "${wheels[@]}"
    if ! timeout 90 "$PY" -m pip install -q --no-index --no-deps --find-links bench/wheels liger-kernel cut-cross-entropy
    then
        # No pip, or an externally managed (PEP 668) system Python: the wheels are pure Python, so unpack them onto
        # PYTHONPATH instead (the bench sections inherit it).
        site=$(mktemp -d)
        for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$site" || echo "gpu_suite: could not unpack $w"; done
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        timeout 60 "$PY" -c "import liger_kernel.chunked_loss, cut_cross_entropy; print('wheels unpacked to $site')" \
            || echo "gpu_suite: wheel install failed; Liger and CCE will be recorded as skipped"
    fi
else
    echo "gpu_suite: bench/wheels has no wheels; Liger and CCE will be recorded as skipped"
fi

stage "install cipo (editable, no deps)"
if timeout 60 "$PY" -c "import cipo.kernels.fused_linear_policy_loss" 2>/dev/null; then
    echo "cipo is already importable with its kernels: not reinstalled"
else
    timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation -e . || echo "gpu_suite: editable install failed"
fi
if ! timeout 60 "$PY" -c "import cipo.kernels.fused_linear_policy_loss" 2>/dev/null; then
    # Fallback: make cipo.kernels resolvable from the checkout itself (this copy of the repository only).
    [ -e cipo/kernels ] || ln -s ../kernels cipo/kernels
    timeout 60 "$PY" -c "import cipo.kernels.fused_linear_policy_loss" || echo "gpu_suite: cipo.kernels not importable"
fi
timeout 60 "$PY" -c "import cipo, cipo.kernels; print('cipo from', cipo.__file__)"

stage "kernel tests on CUDA (real Triton compilation), timeout ${TEST_TIMEOUT} s"
# Compilation dominates on a GPU: spread the tests over pytest-xdist workers when it is installed (it shares
# Triton's on-disk cache). Never on the CPU interpreter (2 cores, and the tests measure CPU memory).
XDIST=()
if [ "${GPU_SUITE_TEST_ON_CPU:-0}" != 1 ] && timeout 30 "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n "${GPU_SUITE_TEST_WORKERS:-8}")
fi
timeout "$TEST_TIMEOUT" "$PY" -m pytest tests/kernels -q -p no:cacheprovider -o addopts="" -rfE --durations=10 \
    ${XDIST[@]+"${XDIST[@]}"} 2>&1 \
    | tee "$OUT/kernel_tests.txt" | tail -n 40
test_rc=${PIPESTATUS[0]}; echo
case $test_rc in
    0) test_status="passed" ;;
    124|137) test_status="TIMED OUT after ${TEST_TIMEOUT} s (see kernel_tests.txt)" ;;
    *) test_status="FAILED (pytest exit code $test_rc)" ;;
esac
echo "kernel tests: $test_status"

[ -n "${GPU_SUITE_SECTIONS:-}" ] && BENCH_ARGS+=(--sections "$GPU_SUITE_SECTIONS")
[ -n "$SKIP" ] && BENCH_ARGS+=(--skip "$SKIP")
stage "timing suite (python -m bench run --suite gpu), $(left) s left"
hard=$(( $(left) - 10 ))
if (( hard > 60 )); then
    timeout "$hard" "$PY" -m bench run --suite gpu --out "$OUT" --budget-s $(( hard - 75 )) --hard-limit-s $(( hard - 5 )) \
        ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
    bench_rc=$?
else
    bench_rc=-1
    echo "gpu_suite: no time left for the timing suite"
fi

# --- long contexts (docs/LONG_CONTEXT.md §5) -----------------------------------------------------------------------
# PREPARED, NOT YET RUN ON A GPU. The largest correction context that trains for a Qwen3-4B-shaped model (bf16,
# random weights, weights + gradients, no optimizer state) under memory caps of 24, 48 and 80 GiB
# (torch.cuda.set_per_process_memory_fraction), for each switch on and off: baseline (fused loss, plain packing),
# shared_prefix, tiled_mlp, checkpointing, materialised_loss, all. One correction group per micro-batch: 8 rollouts x
# 1024 response tokens after a context that doubles from 4096 until OOM, then one bisection step. Several minutes,
# so off by default: GPU_SUITE_LONG_CONTEXT_S=300 runs it after the timing suite, in that many seconds on top of
# GPU_SUITE_BUDGET_S (GPU_SUITE_LONG_CONTEXT_CONFIGS=all,checkpointing,baseline narrows it). On a lent machine with a
# short budget, run the stage alone instead:
#     python -m bench.long_context --suite gpu --budget-s 280 --out $OUT --configs all,checkpointing,shared_prefix
# Output: $OUT/long_context_gpu.{json,md}; the memory model's predictions for the same caps are in the same files,
# so measured and predicted sit side by side. Goal (docs/LONG_CONTEXT.md §5): >= 128k tokens per micro-batch at
# 80 GiB, >= 32k at 24 GiB.
LC_S=${GPU_SUITE_LONG_CONTEXT_S:-0}
lc_rc=skipped
if (( LC_S > 60 )); then
    stage "long contexts (python -m bench.long_context --suite gpu), ${LC_S} s"
    LC_ARGS=(--suite gpu --out "$OUT" --budget-s $(( LC_S - 30 )))
    [ -n "${GPU_SUITE_LONG_CONTEXT_CONFIGS:-}" ] && LC_ARGS+=(--configs "$GPU_SUITE_LONG_CONTEXT_CONFIGS")
    if [ "${GPU_SUITE_TEST_ON_CPU:-0}" = 1 ]; then
        LC_ARGS+=(--device cpu --caps 1 --rollouts 2 --response 16 --start-context 32 --max-context 64)
    fi
    timeout "$LC_S" "$PY" -m bench.long_context "${LC_ARGS[@]}"
    lc_rc=$?
else
    echo "long contexts: skipped (GPU_SUITE_LONG_CONTEXT_S=300 runs python -m bench.long_context --suite gpu)"
fi

stage "summary"
echo "kernel tests: $test_status"
echo "timing suite exit code: $bench_rc"
echo "long contexts exit code: $lc_rc"
# (the timing suite printed its summary table above: `python -m bench summary $OUT/gpu.json` prints it again)
echo "total ${SECONDS} s; files in $OUT:"
ls -l "$OUT"
