"""FP8 block-quantised checkpoints (DeepSeek's release format): dequantised on load, or kept with their scales.

The checkpoints are made by tests/hf/helpers.py's own tile-by-tile quantiser; the oracles are transformers'
FP8 loader (dimensions multiples of 128 or below it, where its inferred tile equals DeepSeek's) and a float64
tile-by-tile dequantiser (any shape, ceil-div tiles).
"""

from __future__ import annotations

import pytest
import torch

from latentmoe.hf import HFCheckpointError, dequantize_blocks, load_pretrained, load_state_dict
from latentmoe.hf.names import build_name_table
from tests.hf.helpers import (
    E4M3_MIN_SUBNORMAL,
    E4M3_REL_STEP,
    all_tensors,
    dequantize_fp64_reference,
    hf_logits,
    hf_v3,
    our_logits,
    quantize_checkpoint,
    quantize_fp8_blocks,
    rel_err,
    token_ids,
)

# Every quantised dimension is a multiple of 128 or below 128 (then one tile spans it): transformers infers the
# tile as dim / scale_grid, which equals DeepSeek's ceil-div 128 tile exactly in these cases.
ALIGNED = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=8, qk_nope_head_dim=16,
               qk_rope_head_dim=16, v_head_dim=16, q_lora_rank=128, kv_lora_rank=112, intermediate_size=512,
               moe_intermediate_size=128)
# Dimensions that are not multiples of 128 and span several tiles (hidden 192 = 128 + 64, ...).
RAGGED = dict(hidden_size=192, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=136, kv_lora_rank=144,
              intermediate_size=200, moe_intermediate_size=72)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    hf = hf_v3(**ALIGNED)
    hf.save_pretrained(root / "bf")
    originals = quantize_checkpoint(root / "bf", root / "fp8")
    return hf, root / "fp8", originals


def test_fp8_checkpoint_matches_transformers_fp8_loader(aligned, monkeypatch):
    import transformers.quantizers.quantizer_finegrained_fp8 as fp8_quantizer
    from transformers import AutoModelForCausalLM

    hf, fp8_dir, _ = aligned
    # transformers asks for accelerate before it dequantises on CPU, but does not use it on this path.
    monkeypatch.setattr(fp8_quantizer, "is_accelerate_available", lambda: True)
    reference = AutoModelForCausalLM.from_pretrained(fp8_dir, dtype=torch.float32).eval()
    model = load_pretrained(fp8_dir, dtype=torch.float32)
    ids = token_ids(hf.config.vocab_size)
    assert rel_err(our_logits(model, ids), hf_logits(reference, ids)) <= 1e-4


def test_dequantised_weights_are_within_e4m3_rounding_of_the_originals(aligned):
    _, fp8_dir, originals = aligned
    state = load_state_dict(fp8_dir, dtype=torch.float32)
    by_hf = build_name_table({k: tuple(v.shape) for k, v in state.tensors.items()}, state.config).by_hf()
    stored = all_tensors(fp8_dir)
    for key, w in originals.items():
        target, expert = by_hf[key]
        loaded = state.tensors[target.ours] if expert is None else state.tensors[target.ours][expert]
        scale = stored[key + "_scale_inv"].repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)
        bound = E4M3_REL_STEP / 2 * w.abs() + E4M3_MIN_SUBNORMAL / 2 * scale[:, : w.shape[1]]
        assert ((loaded - w).abs() <= bound * (1 + 1e-6)).all(), key


def test_dequantize_blocks_handles_ragged_tiles_like_a_float64_reference():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 200)
    q, scale_inv = quantize_fp8_blocks(w)
    assert scale_inv.shape == (3, 2)
    got = dequantize_blocks(q, scale_inv, (128, 128))
    assert torch.allclose(got.double(), dequantize_fp64_reference(q, scale_inv), rtol=2**-24, atol=0)


def test_ragged_fp8_checkpoint_loads_to_the_float64_dequantisation(tmp_path):
    hf = hf_v3(**RAGGED)
    hf.save_pretrained(tmp_path / "bf")
    quantize_checkpoint(tmp_path / "bf", tmp_path / "fp8")
    model = load_pretrained(tmp_path / "fp8", dtype=torch.float32)
    state = model.state_dict()
    by_hf = build_name_table({k: tuple(v.shape) for k, v in state.items()}, model.config).by_hf()
    stored = all_tensors(tmp_path / "fp8")
    checked = 0
    for key, t in stored.items():
        if t.dtype == torch.float8_e4m3fn:
            target, expert = by_hf[key]
            loaded = state[target.ours] if expert is None else state[target.ours][expert]
            reference = dequantize_fp64_reference(t, stored[key + "_scale_inv"])
            assert torch.allclose(loaded.double(), reference, rtol=2**-24, atol=0), key
            checked += 1
    assert checked == 2 * 8 * 3 + 2 * 3 + 3 + 3 * 5  # experts, shared experts, dense MLP, attention


def test_fp8_weights_can_be_kept_with_their_scales(aligned):
    _, fp8_dir, _ = aligned
    state = load_state_dict(fp8_dir, dequantize=False)
    stored = all_tensors(fp8_dir)
    assert state.block == (128, 128)
    q = state.tensors["model.layers.0.self_attn.q_b_proj.weight"]
    assert q.dtype == torch.float8_e4m3fn
    assert torch.equal(q.view(torch.uint8), stored["model.layers.0.self_attn.q_b_proj.weight"].view(torch.uint8))
    assert torch.equal(state.scales["model.layers.0.self_attn.q_b_proj.weight"],
                       stored["model.layers.0.self_attn.q_b_proj.weight_scale_inv"])
    experts = state.tensors["model.layers.1.mlp.experts.up_proj"]
    assert experts.dtype == torch.float8_e4m3fn and experts.shape == (8, 128, 256)
    assert torch.equal(state.scales["model.layers.1.mlp.experts.up_proj"][3],
                       stored["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"])
    assert state.tensors["model.embed_tokens.weight"].dtype == torch.float32  # never quantised
    assert state.tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_fp8_weights_without_quantization_config_are_rejected(aligned, tmp_path):
    import json
    import shutil

    _, fp8_dir, _ = aligned
    shutil.copytree(fp8_dir, tmp_path / "x")
    config = json.loads((tmp_path / "x" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "x" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFCheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\..* no quantization_con"):
        load_pretrained(tmp_path / "x")
