"""Kernel tests: without a GPU, Triton runs through its CPU interpreter, switched on before triton is imported.

``tests/conftest.py`` does the same for the whole session; this keeps ``pytest tests/kernels/...`` self-contained.
On a CUDA machine the kernels compile for real (export ``TRITON_INTERPRET=1`` to interpret them anyway).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
