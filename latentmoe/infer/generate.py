"""Reference generation: one sequence, a contiguous latent cache, materialised attention.

Prefill the prompt once, then decode one token at a time. The cache is the latent-only MLA cache
(``LatentCache``): per layer and token it holds the normalised compressed KV and the rotated shared RoPE
key, nothing per head; every step re-expands K and V from it (the materialised path). This is the simple
reference the engine (``latentmoe.infer.engine``: paged cache, absorbed decode, continuous batching, MTP
speculative decoding) is tested against; use the engine for anything else.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latentmoe.infer.sampling import SamplingParams, filter_logits, sample_next
from latentmoe.model.transformer import CausalLM

__all__ = ["SamplingParams", "filter_logits", "generate", "generate_text", "sample_next"]


@torch.no_grad()
def generate(model: CausalLM, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
    """Generate up to ``max_tokens`` ids after ``prompt_ids`` (stops after a stop token, which is kept)."""
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token")
    limit = model.config.max_position_embeddings
    max_length = min(len(prompt_ids) + params.max_tokens, limit)
    if len(prompt_ids) > limit:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's limit is {limit}")
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    cache = model.new_cache(batch_size=1, max_length=max_length)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    logits = model(ids, cache=cache, start_pos=0, compute_mtp=False, attention="materialised").logits[:, -1]
    out: list[int] = []
    stops = set(params.stop_token_ids)
    while len(out) < params.max_tokens and cache.length < max_length:
        token = int(sample_next(logits, params, generator)[0])
        out.append(token)
        if token in stops or cache.length >= max_length:
            break
        step = torch.tensor([[token]], device=device)
        logits = model(
            step, cache=cache, start_pos=cache.length, compute_mtp=False, attention="materialised"
        ).logits[:, -1]
    model.train(was_training)
    return out


def generate_text(model: CausalLM, tokenizer, prompt: str, params: SamplingParams) -> str:
    """Encode ``prompt`` (latentmoe.hf.tokenizer.encode_prompt: the tokenizer's rule, BOS for ours), generate,
    decode."""
    from latentmoe.hf.tokenizer import encode_prompt

    ids = encode_prompt(tokenizer, prompt, bos_token_id=model.config.bos_token_id)
    return tokenizer.decode(generate(model, ids, params))
