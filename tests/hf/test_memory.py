"""Peak resident memory while loading stays below 1.3× the loaded model (measured in a fresh process).

The peak is ``VmHWM`` (``/proc/self/status``): it counts every resident page, file-mapped ones included, so it
sees what a memory-mapped reader really costs — and unlike ``ru_maxrss`` it is not inherited from the parent
across fork/exec. The baseline is the process's RSS just before loading (after the imports). As a check that the
measurement can see the problem, reading the whole file at once through the same mapping costs about 2×.
The fixed cost of torch's first use of the meta device (imports, ~70 MB) is paid before the baseline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from latentmoe import CausalLM, ModelConfig
from latentmoe.hf import save_pretrained

LIMIT = 1.3
# ~27M parameters (~108 MB in fp32) spread over many tensors of at most a few MB, like a real checkpoint.
CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, moe_intermediate_size=256,
              num_hidden_layers=8, n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2,
              first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64)

MEASURE = """
import json, sys, torch
from latentmoe.hf import load_pretrained
from safetensors.torch import load_file

def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

path, how = sys.argv[1], sys.argv[2]
# torch's first computation on the meta device imports torch._dynamo and sympy (~70 MB): a fixed cost that
# does not grow with the model (the loader builds the model there), so it is paid before the baseline.
torch.empty(2, device="meta").cos()
before = status_mb("VmRSS")
if how == "ours":
    model = load_pretrained(path)
    tensors = list(model.state_dict().values())
    size = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values()) / 2**20
else:  # the whole file through one mapping, then copied into fresh tensors
    state = {k: v.clone() for k, v in load_file(path + "/model.safetensors").items()}
    size = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
peak = status_mb("VmHWM")
print(json.dumps({"extra_mb": peak - before, "model_mb": size}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mem") / "ckpt"
    config = ModelConfig.from_preset("tiny").replace(**CONFIG)
    save_pretrained(CausalLM(config), path)
    return path


def measure(path, how: str) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(path), how], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_peaks_below_1_3x_the_model_size(checkpoint):
    ours = measure(checkpoint, "ours")
    assert ours["model_mb"] > 90
    assert ours["extra_mb"] <= LIMIT * ours["model_mb"], ours
    naive = measure(checkpoint, "naive")
    assert naive["extra_mb"] > 1.6 * naive["model_mb"], naive  # the measurement sees mapped pages
