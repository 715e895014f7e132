"""Prefill on one engine, decode on another (handoff.py): the decode engine's output equals colocated
generation token for token, the bytes carried are the formula's, and bad handoffs are refused."""

import random

import pytest
import torch

from latentmoe.infer import Engine, SamplingParams
from latentmoe.plan.arch import arch_from_model_config
from latentmoe.plan.arith import kv_bytes_per_token


def decode_handoffs(engine, requests):
    """Queue (prompt, params, speculative, handoff) requests on ``engine`` and run it until all finish."""
    ids = []
    for prompt, params, speculative, handoff in requests:
        request = engine.new_request(prompt, params, speculative=speculative, handoff=handoff)
        engine.enqueue(request)
        ids.append(request.request_id)
    results = {}
    while engine.has_unfinished():
        for event in engine.step():
            if event.finished:
                results[event.request_id] = event.result
    return [results[i] for i in ids]


def assert_same_logprobs(ours, theirs):
    """Same tokens and alternatives; values equal up to float64 rounding (batches differ in shape)."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        if a is None or b is None:
            assert a is b
            continue
        assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
        assert [a.logprob, *(v for _, v in a.top)] == pytest.approx([b.logprob, *(v for _, v in b.top)], abs=1e-9)


@pytest.mark.parametrize("speculative", [False, True])
def test_disaggregated_engines_generate_what_one_engine_generates(trained_tiny_mtp2, speculative):
    model = trained_tiny_mtp2
    rng = random.Random(4)
    prompts = [[0] + [rng.randrange(32) for _ in range(rng.randint(1, 20))] for _ in range(6)]
    params = [SamplingParams(max_tokens=rng.randint(1, 10), temperature=t, seed=i, logprobs=2, prompt_logprobs=1)
              for i, t in enumerate([0.0, 0.0, 0.8, 1.2, 0.0, 0.7])]
    colocated = Engine(model, block_size=4, max_batch=3).generate(prompts, params, speculative=speculative)
    prefill = Engine(model, block_size=4, max_batch=1, num_blocks=8)
    handoffs = [prefill.prefill_handoff(p, sp, speculative=speculative) for p, sp in zip(prompts, params, strict=True)]
    assert prefill.num_free_blocks == 8  # each prompt's blocks were freed once its rows were copied out
    decode = Engine(model, block_size=4, max_batch=3)
    results = decode_handoffs(decode, [(p, sp, speculative, h) for p, sp, h in zip(prompts, params, handoffs,
                                                                                    strict=True)])
    for ours, theirs in zip(results, colocated, strict=True):
        assert ours.token_ids == theirs.token_ids
        assert_same_logprobs(ours.logprobs, theirs.logprobs)
        assert_same_logprobs(ours.prompt_logprobs, theirs.prompt_logprobs)
    assert decode.stats.prefill_tokens == 0 and decode.stats.placed_tokens == sum(map(len, prompts))
    assert decode.num_free_blocks == decode.cache.num_blocks


@pytest.mark.parametrize("cache_dtype", ["fp32", "bf16", "fp8"])
def test_handoff_carries_prompt_tokens_times_cache_bytes_per_token(random_tiny, cache_dtype):
    config = random_tiny.config
    engine = Engine(random_tiny, cache_dtype=cache_dtype, block_size=4, num_blocks=16)
    prompt = list(range(11))
    handoff = engine.prefill_handoff(prompt, SamplingParams(max_tokens=1, temperature=0))
    per_layer = {"fp32": 4, "bf16": 2, "fp8": 1}[cache_dtype] * (config.kv_lora_rank + config.qk_rope_head_dim)
    per_layer += 4 if cache_dtype == "fp8" else 0  # one fp32 scale per token and layer
    assert handoff.kv_bytes == len(prompt) * config.num_hidden_layers * per_layer == len(prompt) * \
        engine.cache_bytes_per_token()
    if cache_dtype != "fp8":  # the planner counts elements only
        assert handoff.kv_bytes == len(prompt) * kv_bytes_per_token(arch_from_model_config(config, "tiny"), cache_dtype)
    assert handoff.hidden_nD is None  # only a speculative request needs the hidden states


@pytest.mark.parametrize("cache_dtype", ["fp32", "fp8"])
def test_exported_rows_are_the_cached_rows_and_import_restores_them(random_tiny, cache_dtype):
    engine = Engine(random_tiny, cache_dtype=cache_dtype, block_size=4, num_blocks=16)
    cache = engine.cache
    cache.add_sequence("a")
    cache.ensure("a", 3)
    cache.add_sequence("pad")
    cache.ensure("pad", 5)  # the next sequence's blocks are not consecutive with its first
    cache.ensure("a", 9)
    torch.manual_seed(0)
    rows = torch.randn(9, cache.width)
    for layer in range(cache.num_layers):
        slots = torch.tensor([cache.block_tables["a"][p // 4] * 4 + p % 4 for p in range(9)])
        cache.store(layer, slots, rows * (layer + 1))
    kv, scale = cache.export_rows("a", 9, num_layers=2)
    for layer in range(2):
        latent, rope = cache.read(layer, "a", 9)
        expected = torch.cat([latent, rope], dim=-1)
        got = kv[layer].float() * scale[layer][:, None] if scale is not None else kv[layer]
        torch.testing.assert_close(got, expected)
    cache.add_sequence("b")
    cache.import_rows("b", kv, scale)
    for layer in range(2):
        torch.testing.assert_close(torch.cat(cache.read(layer, "b", 9), -1), torch.cat(cache.read(layer, "a", 9), -1))


def test_a_handoff_that_does_not_fit_is_refused(trained_tiny_mtp2):
    model = trained_tiny_mtp2
    engine = Engine(model, block_size=4)
    params = SamplingParams(max_tokens=3, temperature=0)
    plain = engine.prefill_handoff([0, 4, 5], params)
    with pytest.raises(ValueError, match="different prompt"):
        engine.new_request([0, 4, 6], params, handoff=plain)
    with pytest.raises(ValueError, match="hidden states"):
        engine.new_request([0, 4, 5], params, speculative=True, handoff=plain)
    with pytest.raises(ValueError, match="do not fit a cache"):
        Engine(model, block_size=4, cache_dtype="fp32").new_request([0, 4, 5], params, handoff=plain)
