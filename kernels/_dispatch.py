"""When to run a Triton kernel and when the torch path.

Triton kernels run on CUDA tensors. On CPU tensors they run only when the user forces them with
``CIPO_FORCE_TRITON=1`` — the interpreter (``TRITON_INTERPRET=1``, set before triton is imported) is how
CI checks every kernel against its float64 reference on a machine without a GPU.
"""

from __future__ import annotations

import os

import torch

FORCE_TRITON_ENV = "CIPO_FORCE_TRITON"


def triton_forced() -> bool:
    """True when ``CIPO_FORCE_TRITON=1`` asks for the Triton path on CPU tensors."""
    return os.environ.get(FORCE_TRITON_ENV, "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton path should handle these tensors.

    CUDA tensors always take Triton; CPU tensors take it only when forced, and then the interpreter must be
    on, because compiled Triton cannot run on CPU tensors.
    """
    if any(t.is_cuda for t in tensors):
        return True
    if not triton_forced():
        return False
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            f"{FORCE_TRITON_ENV}=1 on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return True


#: Launch options of the kernels that read logits tiles (statistics, gradient, fused epilogue): no FMA contraction.
#: With contraction the compiler may fuse ``z * inv_temp - max`` into one FMA in one pass and not in another, so the
#: gradient pass would see log-probs that differ from the statistics pass by up to half an ulp of the logit (5e-4 at
#: |z| = 1e4), which showed on an H100 as a large error of the entropy gradient of near-one-hot rows. Without
#: it every expression rounds as written, in every pass, as under the interpreter. These kernels are memory-bound.
NO_FP_FUSION: dict[str, bool] = {"enable_fp_fusion": False}
