"""cipo.kernels — Triton kernels, each ``NAME.py`` beside its torch path ``NAME_torch.py`` (what CPU tensors and float64
run); ``linear_logprob_ref.py`` is the materialised float64 reference, never imported by the dispatch. Imports only
torch, triton and itself."""
