"""Rollouts with transformers' ``generate`` (fallback when vLLM is not installed, or chosen by config)."""

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


class HFEngine(RolloutEngine):
    """``model.generate`` on left-padded prompt batches; logprobs from the raw step logits (see ``base``).

    Args:
        model_dir: a saved causal-LM directory (loaded offline). Ignored when ``model`` is given.
        model: an already loaded ``PreTrainedModel`` to sample from. The engine uses it as is; pass a copy if
            the trainer's policy must not be shared (``update_weights`` writes into it).
        tokenizer: its tokenizer (loaded from ``model_dir`` if None).
        dtype: dtype when loading from ``model_dir``.
        micro_batch: sequences (prompts x n) generated per ``generate`` call, bounding memory.
        device: torch device for a model loaded here.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        model=None,
        tokenizer=None,
        dtype: torch.dtype = torch.float32,
        micro_batch: int = 256,
        device: str | torch.device = "cpu",
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if model is None:
            if model_dir is None:
                raise ValueError("HFEngine needs model_dir or model")
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=dtype, local_files_only=True, attn_implementation="sdpa"
            ).to(device)
        if tokenizer is None:
            src = model_dir if model_dir is not None else model.name_or_path
            tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        self.model = model
        self.tokenizer = tokenizer
        self.micro_batch = max(1, int(micro_batch))
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        self.vocab_size = model.config.vocab_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig) -> RolloutBatch:
        prompts = validate_prompts(prompts, self.vocab_size)
        if n < 1:
            raise ValueError(f"n must be >= 1; got {n}")
        token_ids: list[list[int]] = []
        logprobs: list[list[float]] = []
        finish: list[str] = []
        # Whole prompts per micro-batch so that prompt i's n samples come from one seeded call.
        per_call = max(1, self.micro_batch // n)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(prompts), per_call):
                chunk = prompts[start : start + per_call]
                seed = None if sampling.seed is None else sampling.seed + start
                ids, lps, fins = self._generate_chunk(chunk, n, sampling, seed)
                token_ids += ids
                logprobs += lps
                finish += fins
        finally:
            self.model.train(was_training)
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        return RolloutBatch(prompts, n, token_ids, texts, logprobs, finish, sampling)

    @torch.no_grad()
    def _generate_chunk(
        self, prompts: list[list[int]], n: int, sampling: SamplingConfig, seed: int | None
    ) -> tuple[list[list[int]], list[list[float]], list[str]]:
        from transformers import GenerationConfig

        # HF refuses several greedy sequences per prompt; they would be identical, so decode one and copy it.
        n_req = 1 if sampling.greedy else n
        dev = self.device
        width = max(len(p) for p in prompts)
        # Left padding: the first generated token of every row sits at the same column.
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            input_ids[r, width - len(p) :] = torch.tensor(p)
            attention[r, width - len(p) :] = 1
        gen_cfg = GenerationConfig(
            do_sample=not sampling.greedy,
            temperature=sampling.temperature if not sampling.greedy else None,
            top_p=sampling.top_p if not sampling.greedy else None,
            top_k=max(sampling.top_k, 0) if not sampling.greedy else None,  # HF: 0 disables top-k
            max_new_tokens=sampling.max_tokens,
            num_return_sequences=n_req,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_logits=sampling.return_logprobs,
        )
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=input_ids.to(dev), attention_mask=attention.to(dev), generation_config=gen_cfg
            )
        new = out.sequences[:, width:].cpu()  # [P*n, L] (rows repeat each prompt n times, prompt-major)
        step_lp = None
        if sampling.return_logprobs and new.shape[1] > 0:
            logits = torch.stack(out.logits, dim=1).float().cpu()  # [P*n, L, V] raw (pre-temperature) logits
            logp = torch.log_softmax(logits / sampling.logprob_temperature, dim=-1)
            step_lp = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)  # [P*n, L]
        ids_out: list[list[int]] = []
        lps_out: list[list[float]] = []
        fins: list[str] = []
        for r in range(new.shape[0]):
            row = new[r].tolist()
            eos_at = row.index(self.eos_token_id) if self.eos_token_id in row else -1
            length = eos_at + 1 if eos_at >= 0 else len(row)  # keep eos; drop the padding after it
            ids_out.append(row[:length])
            lps_out.append(step_lp[r, :length].tolist() if step_lp is not None else [])
            fins.append(FINISH_STOP if eos_at >= 0 else FINISH_LENGTH)
        if n_req != n:
            rep = lambda xs: [list(x) if isinstance(x, list) else x for x in xs for _ in range(n)]  # noqa: E731
            ids_out, lps_out, fins = rep(ids_out), rep(lps_out), rep(fins)
        return ids_out, lps_out, fins

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            target = params.get(name)
            if target is None:
                if name == "lm_head.weight" and self.model.config.tie_word_embeddings:
                    continue  # tied to the embedding, which is updated under its own name
                raise KeyError(f"HFEngine.update_weights: unknown parameter {name!r}")
            if target.shape != tensor.shape:
                raise ValueError(f"HFEngine.update_weights: {name} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(target.shape)}")
            target.copy_(tensor.detach().to(device=target.device, dtype=target.dtype))
