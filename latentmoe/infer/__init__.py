"""Inference: the engine (paged latent cache, absorbed MLA decode, continuous batching, MTP speculative
decoding) and its single loop owner ``AsyncEngine``, sampling, and the simple reference ``generate``.

    from latentmoe.infer import Engine, SamplingParams
    engine = Engine(model, tokenizer)                   # or Engine(..., cache_memory_bytes=parse_memory_size("2GiB"))
    result, = engine.generate(["ROMEO:"], SamplingParams(max_tokens=32, temperature=0.0), speculative=True)

Layout: scheduler.py (queues, block reservation), runner.py (forwards), output.py (text, events, stats),
engine.py (composes them), async_engine.py (one background loop, per-request queues), cache_budget.py
(pool size from a memory budget), paged_cache.py, sampling.py, speculative.py, generate.py (reference).
"""

from latentmoe.infer.async_engine import (
    AsyncEngine,
    AsyncEngineError,
    EngineClosedError,
    EngineDeadError,
    EngineSnapshot,
    QueueFullError,
    RequestHandle,
)
from latentmoe.infer.cache_budget import CachePool, parse_memory_size
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
    "AsyncEngine",
    "AsyncEngineError",
    "CachePool",
    "Engine",
    "EngineClosedError",
    "EngineDeadError",
    "EngineSnapshot",
    "EngineStats",
    "GenerationResult",
    "PagedLatentCache",
    "QueueFullError",
    "RequestHandle",
    "RequestOutput",
    "RequestStats",
    "SamplingParams",
    "SpeculativeConfig",
    "filter_logits",
    "generate",
    "generate_text",
    "greedy_accept",
    "parse_memory_size",
    "rejection_sample",
    "sample_next",
    "token_probs",
]
