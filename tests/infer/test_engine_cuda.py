"""The engine on a CUDA device (skipped without one): every tensor it makes lives there, greedy output
equals the CPU engine's, the default budget comes from free device memory, and AsyncEngine serves it."""

import threading

import pytest
import torch

from latentmoe.infer import AsyncEngine, Engine, SamplingParams
from latentmoe.infer.cache_budget import DEFAULT_CACHE_MEMORY_FRACTION

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = [[0, 5, 9, 2], [0, 7], [0, 3, 3, 3, 8, 1], [0, 11, 4]]


@pytest.fixture
def cuda_and_cpu_models(trained_tiny_mtp2):
    cpu = trained_tiny_mtp2
    gpu = type(cpu)(cpu.config).double()
    gpu.load_state_dict(cpu.state_dict())
    return gpu.to("cuda").eval(), cpu


@pytest.mark.parametrize("speculative", [False, True])
def test_cuda_engine_greedy_equals_cpu_engine(cuda_and_cpu_models, speculative):
    gpu, cpu = cuda_and_cpu_models
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (9, 14, 5, 11)]
    engine = Engine(gpu, block_size=4, max_batch=3)
    assert engine.device.type == "cuda" and engine.cache.pool_LNbX.is_cuda
    on_gpu = engine.generate(PROMPTS, params, speculative=speculative)
    on_cpu = Engine(cpu, block_size=4, max_batch=3).generate(PROMPTS, params, speculative=speculative)
    assert [r.token_ids for r in on_gpu] == [r.token_ids for r in on_cpu]
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_engine_moves_a_cpu_model_to_the_device_it_is_given(trained_tiny_mtp2):
    model = type(trained_tiny_mtp2)(trained_tiny_mtp2.config).double()
    model.load_state_dict(trained_tiny_mtp2.state_dict())
    engine = Engine(model, device="cuda", block_size=4)
    assert model.lm_head.weight.is_cuda and engine.runner.device == engine.device
    request = engine.new_request([0, 1], SamplingParams(max_tokens=3, temperature=1.0, seed=4))
    assert request.generator.device.type == "cuda"
    result = engine.generate([[0, 1]], SamplingParams(max_tokens=6, temperature=1.0, seed=4))[0]
    again = engine.generate([[0, 1]], SamplingParams(max_tokens=6, temperature=1.0, seed=4))[0]
    assert result.token_ids == again.token_ids  # the seeded generator on the device reproduces


def test_default_cuda_budget_is_a_fraction_of_device_memory(cuda_and_cpu_models):
    gpu, _ = cuda_and_cpu_models
    _, total = torch.cuda.mem_get_info()
    engine = Engine(gpu, block_size=4, max_batch=2)
    assert 0 < engine.pool.budget_bytes <= DEFAULT_CACHE_MEMORY_FRACTION * total
    assert engine.pool.num_bytes <= engine.pool.budget_bytes


def test_async_engine_on_cuda_serves_threads(cuda_and_cpu_models):
    gpu, cpu = cuda_and_cpu_models
    params = SamplingParams(max_tokens=10, temperature=0.0)
    want = [Engine(cpu, block_size=4).generate([p], params)[0].token_ids for p in PROMPTS]
    got = {}
    with AsyncEngine(Engine(gpu, block_size=4, max_batch=4)) as engine_async:
        def consume(i):
            got[i] = [t for out in engine_async.submit(PROMPTS[i], params) for t in out.new_token_ids]

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert [got[i] for i in range(len(PROMPTS))] == want
