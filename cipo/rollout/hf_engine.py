"""Rollouts with transformers' ``generate`` (fallback when vLLM is not installed, or chosen by config).

Seeded sampling is batch-invariant, as in vLLM: with ``SamplingConfig.seed = s``, sample ``j`` of prompt ``i`` is
drawn from its own generator seeded with ``(s + i, j)``, so a prompt's completions do not depend on the other
prompts of the call, on ``micro_batch``, or on where the call's prompts sit in a larger (data-parallel) batch.
``generate`` then decodes greedily over ``warped logits + Gumbel noise`` (the Gumbel-max trick: the argmax is an
exact sample of the warped softmax) instead of calling ``torch.multinomial`` on the global RNG, whose draws for a
row depend on the whole batch.
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

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser: a bijective 64-bit mix (unrelated inputs -> unrelated generator seeds)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(prompt_seed: int, sample: int) -> int:
    """Generator seed of sample ``sample`` (0..n-1) of a prompt seeded with ``prompt_seed``; in [0, 2**64).

    Mixed rather than e.g. ``prompt_seed * n + sample`` so that (prompt, sample) pairs of different calls or steps
    do not share streams; its low 32 bits (all a CPU generator uses) are mixed too.
    """
    return _splitmix64(_splitmix64(prompt_seed & _MASK64) ^ sample)


class SeededGumbelSampler:
    """A logits processor: temperature, top-k and top-p (HF's own warpers), then Gumbel noise from one
    ``torch.Generator`` per row. (Duck-typed, so that importing this module does not import transformers.)

    Used with greedy decoding (``do_sample=False``): ``argmax(warped + Gumbel)`` is a sample of
    ``softmax(warped)``. Every row draws exactly ``V`` uniforms per step from its generator whatever the batch is,
    so its noise stream, and hence its tokens, depend only on its seed and its own logits.

    Args:
        sampling: temperature > 0, top_k (<= 0 disables), top_p (1 disables).
        seeds: ``[R]`` generator seeds, one per batch row, in row order.
        device: device of the logits (the generators live there).
    """

    def __init__(self, sampling: SamplingConfig, seeds: Sequence[int], device: torch.device) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        if sampling.greedy:
            raise ValueError("SeededGumbelSampler needs temperature > 0")
        self.warpers = [TemperatureLogitsWarper(sampling.temperature)]
        if sampling.top_k > 0:
            self.warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``scores``: ``[R, V]`` fp32 raw logits of the step (not modified: HF keeps them for ``output_logits``).
        Returns ``[R, V]`` warped logits + Gumbel noise (-inf where top-k / top-p removed a token)."""
        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"SeededGumbelSampler has {len(self.generators)} generators, got {scores.shape[0]} rows")
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        u = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
        for r, gen in enumerate(self.generators):
            u[r].uniform_(generator=gen)
        # -log(-log(u)) ~ Gumbel(0, 1); u == 0 gives -inf (never picked), u < 1 always.
        return scores + -torch.log(-torch.log(u))


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
        # Whole prompts per micro-batch (bounds the rows of one call); sampling does not depend on the split.
        per_call = max(1, self.micro_batch // n)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(prompts), per_call):
                chunk = prompts[start : start + per_call]
                ids, lps, fins = self._generate_chunk(chunk, n, sampling, start)
                token_ids += ids
                logprobs += lps
                finish += fins
        finally:
            self.model.train(was_training)
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        return RolloutBatch(prompts, n, token_ids, texts, logprobs, finish, sampling)

    @torch.no_grad()
    def _generate_chunk(
        self, prompts: list[list[int]], n: int, sampling: SamplingConfig, first: int
    ) -> tuple[list[list[int]], list[list[float]], list[str]]:
        """Sample ``n`` completions of each of ``prompts``, which are prompts ``first, first + 1, ...`` of the
        ``generate`` call (prompt ``first + i`` is seeded with ``sampling.seed + first + i``)."""
        from transformers import GenerationConfig, LogitsProcessorList

        # Greedy sequences of one prompt are identical: decode one and copy it.
        n_req = 1 if sampling.greedy else n
        dev = self.device
        width = max(len(p) for p in prompts)
        # Left padding: the first generated token of every row sits at the same column.
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            input_ids[r, width - len(p) :] = torch.tensor(p)
            attention[r, width - len(p) :] = 1
        # Rows are prompt-major, [P * n_req]: row r is sample r % n_req of prompt r // n_req (as HF's own expansion).
        input_ids = input_ids.repeat_interleave(n_req, dim=0)
        attention = attention.repeat_interleave(n_req, dim=0)
        seeded = sampling.seed is not None and not sampling.greedy
        # Seeded: greedy decoding over our per-row Gumbel noise; unseeded: HF's multinomial on the global RNG.
        hf_sample = not sampling.greedy and not seeded
        processors = LogitsProcessorList()
        if seeded:
            seeds = [row_seed(sampling.seed + first + r // n_req, r % n_req) for r in range(input_ids.shape[0])]
            processors.append(SeededGumbelSampler(sampling, seeds, dev))
        gen_cfg = GenerationConfig(
            do_sample=hf_sample,
            temperature=sampling.temperature if hf_sample else None,
            top_p=sampling.top_p if hf_sample else None,
            top_k=max(sampling.top_k, 0) if hf_sample else None,  # HF: 0 disables top-k
            max_new_tokens=sampling.max_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_logits=sampling.return_logprobs,
        )
        out = self.model.generate(
            input_ids=input_ids.to(dev),
            attention_mask=attention.to(dev),
            generation_config=gen_cfg,
            logits_processor=processors,
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
