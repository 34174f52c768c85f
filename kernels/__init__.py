"""cipo.kernels — Triton kernels, each beside its plain-torch reference (the CPU path)."""
