"""The cache pool sized from a memory budget: the size parser and the sizing rule on hand-worked examples,
the formula against the allocated pool, DeepSeek-V3 on the meta device (no full-context pool), admission
under a budget, and the clear error for a request that can never fit."""

import math
import os

import pytest
import torch

import latentmoe.infer.engine as engine_module
from latentmoe import CausalLM, ModelConfig
from latentmoe.infer import Engine, SamplingParams, generate
from latentmoe.infer.cache_budget import (
    DEFAULT_CACHE_MEMORY_FRACTION,
    CachePool,
    parse_memory_size,
    size_cache_pool,
)
from latentmoe.infer.paged_cache import PagedLatentCache, latent_bytes_per_token

GIB = 2**30


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2GiB", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("4096", 4096),
        ("64 kib", 65_536),
        (" 3 TB ", 3 * 10**12),
        ("0.5KiB", 512),
        ("1B", 1),
        ("2gb", 2 * 10**9),
    ],
)
def test_parse_memory_size_by_hand(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "2 GiBs", "-1GiB", "1e9", "0", "0.1B", "two", "2 G iB"])
def test_parse_memory_size_rejects_what_is_not_a_size(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_memory_size(text)


def test_size_cache_pool_by_hand():
    # 1000-byte blocks of 10 tokens; the cap is 2 sequences x (ceil(95 / 10) + 1 spare) = 22 blocks
    common = dict(bytes_per_block=1000, block_size=10, max_batch=2, max_model_len=95)
    assert size_cache_pool(**common, budget_bytes=5999) == CachePool(5, 10, 1000, budget_bytes=5999, capped=False)
    capped = size_cache_pool(**common, budget_bytes=10**6)
    assert (capped.num_blocks, capped.capped, capped.num_bytes, capped.num_tokens) == (22, True, 22_000, 220)
    assert size_cache_pool(**common, num_blocks=7).num_blocks == 7  # an explicit count is taken as given
    with pytest.raises(ValueError, match="cache_memory_bytes"):
        size_cache_pool(**common, budget_bytes=999)
    with pytest.raises(ValueError, match="exactly one"):
        size_cache_pool(**common)
    with pytest.raises(ValueError, match="exactly one"):
        size_cache_pool(**common, budget_bytes=5000, num_blocks=5)
    assert CachePool(3, 64, 2**20).describe() == "3 blocks x 64 tokens = 192 tokens, 3.0 MiB"


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_bytes_per_token_formula_equals_the_allocated_pool(dtype, num_layers):
    config = ModelConfig.from_preset("tiny")
    cache = PagedLatentCache(config, num_layers=num_layers, num_blocks=2, block_size=4, dtype=dtype)
    assert latent_bytes_per_token(config, num_layers=num_layers, dtype=dtype) == cache.bytes_per_token()
    pool_bytes = cache.pool_LNbX.numel() * cache.pool_LNbX.element_size()
    if cache.scale_LNb is not None:
        pool_bytes += cache.scale_LNb.numel() * cache.scale_LNb.element_size()
    assert pool_bytes == 2 * 4 * cache.bytes_per_token()


@pytest.fixture(scope="module")
def v3_on_meta() -> CausalLM:
    with torch.device("meta"):
        return CausalLM(ModelConfig.from_preset("deepseek-v3")).to(torch.bfloat16)


# DeepSeek-V3 in bf16: (61 main + 1 MTP) layers x (512 + 64) x 2 bytes per token, 64 tokens per block
V3_BYTES_PER_BLOCK = (61 + 1) * (512 + 64) * 2 * 64
V3_FULL_CONTEXT_BLOCKS = 16 * (math.ceil(163_840 / 64) + 1)  # the old default: ~187 GB


def test_deepseek_v3_on_meta_gets_the_pool_its_budget_buys(v3_on_meta):
    engine = Engine(v3_on_meta, cache_memory_bytes=parse_memory_size("2GiB"))
    expected = 2 * GIB // V3_BYTES_PER_BLOCK  # 469 blocks
    assert engine.pool.num_blocks == expected and not engine.pool.capped
    assert engine.pool.num_bytes <= 2 * GIB < engine.pool.num_bytes + V3_BYTES_PER_BLOCK
    assert engine.cache.pool_LNbX.shape == (62, expected, 64, 576) and engine.cache.pool_LNbX.is_meta
    assert engine.pool.num_blocks < V3_FULL_CONTEXT_BLOCKS / 80


def test_deepseek_v3_default_budget_is_a_fraction_of_available_memory(v3_on_meta, monkeypatch):
    available = 24 * GIB
    monkeypatch.setattr(engine_module, "available_memory_bytes", lambda device: available)
    engine = Engine(v3_on_meta)
    budget = int(available * DEFAULT_CACHE_MEMORY_FRACTION)
    assert engine.pool.budget_bytes == budget
    assert engine.pool.num_blocks == budget // V3_BYTES_PER_BLOCK


def test_deepseek_v3_default_pool_fits_the_memory_this_machine_has(v3_on_meta):
    engine = Engine(v3_on_meta)
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert engine.pool.num_bytes <= engine.pool.budget_bytes <= DEFAULT_CACHE_MEMORY_FRACTION * physical
    assert engine.pool.num_blocks < V3_FULL_CONTEXT_BLOCKS


def test_a_huge_budget_is_capped_at_what_max_batch_full_length_sequences_use(v3_on_meta):
    engine = Engine(v3_on_meta, cache_memory_bytes=10**15)
    assert engine.pool.capped and engine.pool.num_blocks == V3_FULL_CONTEXT_BLOCKS
    short = Engine(v3_on_meta, cache_memory_bytes=10**15, max_model_len=4096, max_batch=4)
    assert short.pool.num_blocks == 4 * (4096 // 64 + 1)


def test_a_request_that_can_never_fit_is_a_value_error_naming_the_pool(v3_on_meta, random_tiny):
    small = Engine(v3_on_meta, cache_memory_bytes=4 * V3_BYTES_PER_BLOCK)  # 4 blocks = 256 tokens
    with pytest.raises(ValueError, match="cache pool holds 4 blocks = 256 tokens"):
        small.add_request([0] * 200, SamplingParams(max_tokens=57))
    assert not small.has_unfinished()
    small.add_request([0] * 200, SamplingParams(max_tokens=56))  # exactly 256 positions: it fits
    engine = Engine(random_tiny, block_size=4, num_blocks=3)
    with pytest.raises(ValueError, match="max_tokens.*cache pool holds 3 blocks"):
        engine.generate([[0, 1, 2]], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="cache pool"):  # the drafts' slack counts too
        engine.generate([[0, 1, 2]], SamplingParams(max_tokens=8), speculative=True)
    assert engine.generate([[0, 1, 2]], SamplingParams(max_tokens=9, temperature=0))[0].token_ids


def test_admission_under_a_budget_queues_what_does_not_fit(random_tiny):
    """A budget of six blocks and change (each request reserves 3 blocks): the third request waits."""
    c = random_tiny.config
    bytes_per_block = 4 * (c.num_hidden_layers + c.num_nextn_predict_layers) * (c.kv_lora_rank + c.qk_rope_head_dim) * 4
    budget = 7 * bytes_per_block - 1
    engine = Engine(random_tiny, block_size=4, max_batch=8, cache_memory_bytes=budget)
    assert engine.pool.num_blocks == 6 and engine.pool.num_bytes == 6 * bytes_per_block
    params = SamplingParams(max_tokens=6, temperature=0)
    prompts = [[0, 1, 2, 3, 4, 5], [0, 9], [0, 7, 7]]
    ids = [engine.add_request(p, params) for p in prompts]
    engine.step()
    assert len(engine.running) == 2 and len(engine.waiting) == 1
    results = {}
    while engine.has_unfinished():
        for e in engine.step():
            if e.finished:
                results[e.request_id] = e.result
    for i, prompt in zip(ids, prompts, strict=True):
        assert results[i].token_ids == generate(random_tiny, prompt, params)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_blocks": 4, "cache_memory_bytes": 10**6}, "cache_memory_bytes"),
        ({"cache_memory_bytes": 0}, "cache_memory_bytes"),
        ({"cache_memory_bytes": 100}, "cache_memory_bytes"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"max_model_len": 513}, "max_model_len"),
        ({"max_model_len": 0}, "max_model_len"),
    ],
)
def test_bad_pool_settings_name_the_field(random_tiny, kwargs, field):
    with pytest.raises(ValueError, match=field):
        Engine(random_tiny, **kwargs)


def test_max_model_len_limits_requests(random_tiny):
    engine = Engine(random_tiny, max_model_len=16, max_batch=2)
    assert engine.pool.num_blocks == 2 * (1 + 1)  # 16 tokens fit one 64-token block, plus the spare
    with pytest.raises(ValueError, match="max_model_len=16"):
        engine.add_request([0] * 10, SamplingParams(max_tokens=7))
    engine.add_request([0] * 10, SamplingParams(max_tokens=6))
