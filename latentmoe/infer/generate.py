"""Simple KV-cached generation: prefill the prompt once, then decode one token at a time.

The cache is the latent-only MLA cache (``LatentCache``): per layer and token it holds the normalised
compressed KV and the rotated shared RoPE key, nothing per head. Decoding here still re-expands K and V
from the latent at every step (the materialised path); the absorbed decode path and the batched
engine with continuous batching and MTP speculative decoding are separate work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from latentmoe.model.transformer import CausalLM


@dataclass
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits_BV: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest nucleus with mass ≥ top_p to −inf.

    The most likely token always survives. Pure function; returns a new tensor.
    """
    logits_BV = logits_BV.float().clone()
    if top_k and top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits_BV.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV


def sample_next(
    logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids ``[B]`` from the last-position logits."""
    if params.temperature == 0:
        return logits_BV.argmax(dim=-1)
    filtered = filter_logits(logits_BV / params.temperature, top_k=params.top_k, top_p=params.top_p)
    return torch.multinomial(filtered.softmax(dim=-1), 1, generator=generator)[:, 0]


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
    logits = model(ids, cache=cache, start_pos=0, compute_mtp=False).logits[:, -1]
    out: list[int] = []
    stops = set(params.stop_token_ids)
    while len(out) < params.max_tokens and cache.length < max_length:
        token = int(sample_next(logits, params, generator)[0])
        out.append(token)
        if token in stops or cache.length >= max_length:
            break
        step = torch.tensor([[token]], device=device)
        logits = model(step, cache=cache, start_pos=cache.length, compute_mtp=False).logits[:, -1]
    model.train(was_training)
    return out


def generate_text(model: CausalLM, tokenizer, prompt: str, params: SamplingParams) -> str:
    """Encode ``prompt`` (with the BOS token the training documents start with), generate, decode."""
    bos = model.config.bos_token_id
    ids = tokenizer.encode(prompt).ids
    if bos is not None:
        ids = [bos, *ids]
    return tokenizer.decode(generate(model, ids, params))
