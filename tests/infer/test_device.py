"""Device plumbing of the inference side: the selection helper and an engine whose every tensor follows the
device it is given (no device literals anywhere in the package: tests/test_device.py)."""

import os

import pytest
import torch

from latentmoe.device import available_memory_bytes, resolve_device
from latentmoe.infer import Engine, SamplingParams


def test_resolve_device_by_hand():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(torch.device("meta")) == torch.device("meta")  # a torch.device passes through
    expected_auto = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected_auto and resolve_device(None) == expected_auto
    for bad in ("tpu", "gpu", "cuda:x", "", "meta"):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
def test_resolve_device_refuses_cuda_without_cuda():
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device(spec)


def test_available_memory_is_positive_and_below_physical_memory():
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    available = available_memory_bytes(torch.device("cpu"))
    assert 0 < available <= physical


def test_engine_follows_the_device_it_is_given(random_tiny):
    engine = Engine(random_tiny, device="cpu", num_blocks=8)
    assert engine.device == torch.device("cpu") == engine.cache.pool_LNbX.device
    assert engine.runner.device == engine.device
    result = engine.generate([[0, 3, 4]], SamplingParams(max_tokens=3, temperature=1.0, seed=3))[0]
    assert len(result.token_ids) == 3
    request = engine.new_request([0, 1], SamplingParams(max_tokens=2, seed=1))
    assert request.generator.device == engine.device


def test_engine_on_a_meta_model_refuses_a_real_device():
    from latentmoe import CausalLM, ModelConfig

    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="meta"):
        Engine(model, device="cpu", num_blocks=4)
