"""Device selection: one helper names devices; "auto" picks CUDA only when torch sees it; bad specs are one line."""

import ast
from pathlib import Path

import pytest
import torch

from latentmoe.device import DeviceError, collective_backend, rank_device, resolve_device

PACKAGE = Path(__file__).resolve().parents[1] / "latentmoe"
DEVICE_NAMES = ("cpu", "cuda")


def test_auto_is_the_cpu_without_cuda_and_cuda_zero_with_it():
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected == resolve_device(None)
    assert resolve_device("cpu") == torch.device("cpu")
    assert rank_device(3, "cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_asking_for_cuda_without_it_is_a_clear_error(spec):
    with pytest.raises(DeviceError, match="no CUDA device"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cpu:0:1", "", "CUDA:-1"])
def test_malformed_specs_name_the_choices(spec):
    with pytest.raises(DeviceError, match=r"is not one of auto, cpu, cuda, cuda:N"):
        resolve_device(spec)


def test_collective_backend_follows_the_device():
    assert collective_backend(torch.device("cpu")) == "gloo"
    assert collective_backend(torch.device("cuda", 0)) == "nccl"


def device_literals(path: Path) -> list[str]:
    """String constants of a Python file that spell a device ("cpu", "cuda", "cuda:N"), with their lines."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in DEVICE_NAMES or node.value.startswith("cuda:"):
                found.append(f"{node.lineno}: {node.value!r}")
    return found


def test_the_literal_scan_can_fail(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        'x = torch.device("cuda:1")\ny = "gpu"\nw = \'cpu\'  # "cuda" in a comment\n"""a cpu docstring"""\n'
    )
    assert sorted(device_literals(sample)) == ["1: 'cuda:1'", "3: 'cpu'"]


def test_no_module_but_the_device_helper_spells_a_device_name():
    """Every "cpu" / "cuda" string constant in the package lives in latentmoe/device.py (docstrings may mention
    them; a literal used as a value may not)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "device.py" and path.parent == PACKAGE:
            continue
        offenders += [f"{path.relative_to(PACKAGE.parent)}:{hit}" for hit in device_literals(path)]
    assert offenders == []
