"""Absorbed MLA (attention straight against the latent) against the materialised reference."""

import pytest
import torch

from latentmoe import CausalLM, ModelConfig
from latentmoe.model.mla import MLA, absorbed_is_cheaper, rotate, start_positions_mask
from latentmoe.model.rope import RotaryEmbedding

REL_TOL_FP32 = 1e-4  # the bound for fp32 logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def mla_inputs(config, *, B, S, T, dtype, seed):
    """Per-head queries for the last S of T positions, and the latent cache of all T positions."""
    torch.manual_seed(seed)
    attn = MLA(config, layer_idx=0).to(dtype)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    rotary = RotaryEmbedding(config)
    cos, sin = rotary(torch.arange(T))
    x = torch.randn(B, T, config.hidden_size, dtype=dtype)
    q = attn.project_queries(x[:, T - S :])
    q_nope, q_rope = q.split([config.qk_nope_head_dim, config.qk_rope_head_dim], dim=-1)
    q_rope = rotate(q_rope, cos[T - S :].to(dtype), sin[T - S :].to(dtype))
    kv, kr = attn.compress_kv(x, cos.to(dtype), sin.to(dtype))
    return attn, q_nope, q_rope, kv, kr


@pytest.mark.parametrize("S, T", [(1, 1), (1, 37), (4, 37), (37, 37)])
def test_absorbed_decode_matches_materialised_attention(S, T):
    config = ModelConfig.from_preset("tiny")
    attn, q_nope, q_rope, kv, kr = mla_inputs(config, B=3, S=S, T=T, dtype=torch.float64, seed=S + T)
    ref = attn.attend(q_nope, q_rope, kv, kr)
    ours = attn.attend_absorbed(q_nope, q_rope, kv, kr)
    assert ours.shape == ref.shape == (3, S, config.num_attention_heads, config.v_head_dim)
    assert rel_err(ours, ref) < 1e-12  # the same algebra, only reassociated


def test_absorbed_matches_materialised_with_per_sequence_masks_fp32():
    """Sequences of different lengths in one padded batch: the mask from their start positions."""
    config = ModelConfig.from_preset("tiny")
    attn, q_nope, q_rope, kv, kr = mla_inputs(config, B=3, S=2, T=20, dtype=torch.float32, seed=3)
    mask = start_positions_mask(torch.tensor([18, 5, 0]), 2, 20)
    ref = attn.attend(q_nope, q_rope, kv, kr, attn_mask_BST=mask)
    ours = attn.attend_absorbed(q_nope, q_rope, kv, kr, attn_mask_BST=mask)
    assert rel_err(ours, ref) < REL_TOL_FP32


def test_absorbed_cached_decode_logits_match_materialised_fp32():
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny")
    model = CausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 24))
    logits = {}
    with torch.no_grad():
        for mode in ("materialised", "absorbed"):
            cache = model.new_cache(batch_size=2, max_length=24)
            steps = [model(ids[:, :16], cache=cache, start_pos=0, attention=mode).logits]
            steps += [model(ids[:, t : t + 1], cache=cache, start_pos=t, attention=mode).logits for t in range(16, 24)]
            logits[mode] = torch.cat(steps, dim=1)
        full = model(ids).logits
    assert rel_err(logits["absorbed"], logits["materialised"]) < REL_TOL_FP32
    assert rel_err(logits["absorbed"], full) < REL_TOL_FP32


def test_auto_attention_picks_absorbed_for_decode_and_materialised_for_long_prefill():
    v3 = ModelConfig.from_preset("deepseek-v3")
    assert absorbed_is_cheaper(v3, 1, 4096)
    assert absorbed_is_cheaper(v3, 2, 4096)  # speculative verification
    assert not absorbed_is_cheaper(v3, 4096, 4096)  # 2·512 > 128 + 128: expanding once is cheaper


def test_unknown_attention_mode_names_the_field():
    model = CausalLM(ModelConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="attention"):
        model(torch.zeros(1, 3, dtype=torch.long), attention="fast")
