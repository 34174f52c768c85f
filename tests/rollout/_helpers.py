"""Helpers of the rollout tests: an fp32 HF reference for sampled-token logprobs, and test prompts."""

import torch


def hf_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of ``completion``'s tokens after ``prompt``: one fp32 HF forward, no cache.
    Returns ``[len(completion)]`` float32."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    rows = logp[len(prompt) - 1 : len(prompt) - 1 + len(completion)]
    return rows.gather(-1, torch.tensor(completion)[:, None])[:, 0]


def max_logprob_error(model, batch) -> float:
    """Largest |engine logprob - HF reference| over every completion token of a RolloutBatch."""
    err = 0.0
    for k, comp in enumerate(batch.token_ids):
        ref = hf_logprobs(model, batch.prompt_token_ids[batch.prompt_index[k]], comp,
                          batch.sampling.logprob_temperature)
        err = max(err, (ref - torch.tensor(batch.logprobs[k])).abs().max().item())
    return err


def prompts_for(tokenizer, exprs=("12+34", "505+7", "9+990")) -> list[list[int]]:
    from cipo.warmstart import chat_prompt_ids

    return [chat_prompt_ids(tokenizer, f"What is {e}? Put the answer in \\boxed{{}}.") for e in exprs]


def eos_only_model(model, eos_id: int):
    """Modify ``model`` in place so that it always predicts ``eos_id``; return it and the changed parameter names.

    Attention/MLP outputs are zeroed, so the last hidden state is the normed embedding, which is made the same
    positive unit vector for every token; only the eos row of the LM head reads it.
    """
    changed = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
                changed.add(name)
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, 0] = 1.0
        model.model.norm.weight.fill_(1.0)
        head = model.lm_head.weight
        head.zero_()
        head[eos_id, 0] = 10.0
        changed |= {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    return model, changed
