"""cipo.kernels — Triton kernels, each beside its torch reference; imports only torch, triton and itself."""
