"""Helpers for the Hugging Face interop tests: tiny random models on both sides, logits, an FP8 quantiser.

The FP8 quantiser and the float64 dequantiser here are written independently of latentmoe.hf.fp8 (explicit
loops over tiles) so that the loader is checked against something it does not share code with.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from latentmoe import CausalLM, ModelConfig

E4M3_MAX = 448.0
E4M3_REL_STEP = 2.0**-3  # 3 mantissa bits: neighbouring normal values differ by at most 2^-3 relative
E4M3_MIN_SUBNORMAL = 2.0**-9


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere: norms near 1, matrices N(0, 0.1²) (routers 0.3), router biases ±0.05."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "norm" in name:
            p.copy_(1 + 0.1 * noise)
        else:
            p.copy_((0.3 if name.endswith("gate.weight") else 0.1) * noise)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model.eval()


TINY_HF = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    max_position_embeddings=128,
)


def hf_v3(seed: int = 0, **overrides):
    """A random transformers ``DeepseekV3ForCausalLM`` (fp32, eval)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    return randomize_(DeepseekV3ForCausalLM(DeepseekV3Config(**{**TINY_HF, **overrides})), seed)


def hf_v2(seed: int = 0, **overrides):
    """A random transformers ``DeepseekV2ForCausalLM`` (softmax routing, no bias)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    base = {**TINY_HF, "n_shared_experts": 2, "routed_scaling_factor": 1.5, "q_lora_rank": None}
    torch.manual_seed(seed)
    return randomize_(DeepseekV2ForCausalLM(DeepseekV2Config(**{**base, **overrides})), seed)


def ours(preset: str = "tiny", seed: int = 0, **overrides) -> CausalLM:
    """A random latentmoe CausalLM of a preset (with its MTP module)."""
    config = ModelConfig.from_preset(preset)
    if overrides:
        config = config.replace(**overrides)
    torch.manual_seed(seed)
    return randomize_(CausalLM(config), seed)


def token_ids(vocab_size: int, *, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@torch.no_grad()
def our_logits(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``directory`` (copied out)."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[key] = f.get_tensor(key).clone()
    return out


# ------------------------------------------------------------------------------------ FP8, independently


def quantize_fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-style block quantisation, tile by tile: scale = amax/448 per (block × block) tile (ceil-div
    tiles, the last ones cut short), q = clamp(w / scale) in float8_e4m3fn. Returns (q, weight_scale_inv)."""
    M, N = w.shape
    rows, cols = -(-M // block), -(-N // block)
    q = torch.empty(M, N, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(rows, cols, dtype=torch.float32)
    w = w.float()
    for i in range(rows):
        for j in range(cols):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            scale = max(tile.abs().max().item(), 1e-12) / E4M3_MAX
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (
                (tile / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            )
            scale_inv[i, j] = scale
    return q, scale_inv


def dequantize_fp64_reference(q: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Element by tile: W[i, j] = q[i, j] · scale_inv[i // block, j // block], in float64."""
    out = q.to(torch.float64)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            out[i * block : (i + 1) * block, j * block : (j + 1) * block] *= float(scale_inv[i, j])
    return out


def is_quantised_in_release(key: str, tensor: torch.Tensor) -> bool:
    """The linear weights DeepSeek's FP8 release stores in FP8: 2-D ``*_proj.weight`` in the layers (not the
    router gate, the embedding, the head or the norms)."""
    linear = key.endswith(("_proj.weight", "_proj_with_mqa.weight"))
    return key.startswith("model.layers.") and linear and tensor.dim() == 2


def quantize_checkpoint(src: Path, dst: Path, *, block: int = 128) -> dict[str, torch.Tensor]:
    """Copy an HF directory into ``dst`` with its linear weights FP8 block-quantised (+ quantization_config).
    Returns the original full-precision weights that were quantised."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = all_tensors(src)
    out, originals = {}, {}
    for key, t in tensors.items():
        if is_quantised_in_release(key, t):
            originals[key] = t
            out[key], out[key + "_scale_inv"] = quantize_fp8_blocks(t, block)
        else:
            out[key] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [block, block]
    }
    (dst / "config.json").write_text(json.dumps(config))
    return originals
