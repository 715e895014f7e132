"""Device plumbing of the inference side: the selection helper, no device literals in latentmoe/infer/, and
an engine whose every tensor follows the device it is given."""

import ast
import os
from pathlib import Path

import pytest
import torch

import latentmoe.infer
from latentmoe.device import available_memory_bytes, resolve_device
from latentmoe.infer import Engine, SamplingParams

DEVICE_KINDS = {"cpu", "cuda"}


def string_literals(path: Path) -> list[tuple[int, str]]:
    """Every string constant in a Python file with its line (docstrings and f-string pieces included;
    comments are not code)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_no_device_kind_is_spelled_in_the_inference_package():
    root = Path(latentmoe.infer.__file__).parent
    offenders = [
        f"{path.name}:{line}: {value!r}"
        for path in sorted(root.glob("*.py"))
        for line, value in string_literals(path)
        if value.split(":")[0] in DEVICE_KINDS
    ]
    assert offenders == []


def test_the_literal_scan_finds_a_device_literal(tmp_path):
    """The scan above can fail: it finds both spellings in a file written to contain them."""
    sample = tmp_path / "sample.py"
    sample.write_text('x = torch.device("cuda:1")\ny = "gpu"\nz = f"{x}"\nw = \'cpu\'  # "cuda" in a comment\n')
    found = [v for _, v in string_literals(sample) if v.split(":")[0] in DEVICE_KINDS]
    assert sorted(found) == ["cpu", "cuda:1"]


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
