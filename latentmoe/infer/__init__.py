"""Inference: the engine (paged latent cache, absorbed MLA decode, continuous batching, MTP speculative
decoding), sampling, and the simple reference ``generate``.

    from latentmoe.infer import Engine, SamplingParams
    engine = Engine(model, tokenizer)
    result, = engine.generate(["ROMEO:"], SamplingParams(max_tokens=32, temperature=0.0), speculative=True)
"""

from latentmoe.infer.engine import Engine, EngineStats, GenerationResult, RequestOutput, RequestStats
from latentmoe.infer.generate import generate, generate_text
from latentmoe.infer.paged_cache import PagedLatentCache
from latentmoe.infer.sampling import (
    SamplingParams,
    filter_logits,
    greedy_accept,
    rejection_sample,
    sample_next,
    token_probs,
)
from latentmoe.infer.speculative import SpeculativeConfig

__all__ = [
    "Engine",
    "EngineStats",
    "GenerationResult",
    "PagedLatentCache",
    "RequestOutput",
    "RequestStats",
    "SamplingParams",
    "SpeculativeConfig",
    "filter_logits",
    "generate",
    "generate_text",
    "greedy_accept",
    "rejection_sample",
    "sample_next",
    "token_probs",
]
