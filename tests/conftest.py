"""Test-session setup shared by every test directory.

Triton kernels run on CPU tensors only through the interpreter, and the interpreter must be switched on
before triton is imported anywhere in the process — hence here, at the root, before any test module loads.
On a CUDA machine the kernels compile for real instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
