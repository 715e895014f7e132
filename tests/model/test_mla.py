"""MLA against a float64 reference written straight from the TR's equations (1)–(11)."""

import math

import torch

from latentmoe import CausalLM, ModelConfig
from latentmoe.model.mla import MLA
from latentmoe.model.rope import RotaryEmbedding


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope_complex(x, positions, inv_freq):
    """Rotate interleaved pairs as complex numbers: (x0 + i x1) * exp(i * pos * freq)."""
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    angle = positions[:, None].double() * inv_freq[None, :].double()
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.view_as_real(z).reshape(x.shape)


def mla_reference(attn: MLA, h, inv_freq):
    """Eq. (1)-(11) for one sequence h [T, d], per head, in float64, with explicit causal softmax."""
    c = attn.config
    W = {n: p.detach().double() for n, p in attn.named_parameters()}
    T = h.shape[0]
    pos = torch.arange(T)
    nh, dn, dr, dv = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    if c.q_lora_rank is None:  # no query compression (DeepSeek-V2-Lite): one projection straight from h
        q_all = (h @ W["q_proj.weight"].T).view(T, nh, dn + dr)
    else:
        c_q = rms(h @ W["q_a_proj.weight"].T, W["q_a_layernorm.weight"], c.rms_norm_eps)  # eq. 6
        q_all = (c_q @ W["q_b_proj.weight"].T).view(T, nh, dn + dr)  # eq. 7-8 (W^UQ and W^QR stacked per head)
    kv_a = h @ W["kv_a_proj_with_mqa.weight"].T
    c_kv = rms(kv_a[:, : c.kv_lora_rank], W["kv_a_layernorm.weight"], c.rms_norm_eps)  # eq. 1
    k_r = rope_complex(kv_a[:, c.kv_lora_rank :], pos, inv_freq)  # eq. 3: one key shared by all heads
    kv_up = (c_kv @ W["kv_b_proj.weight"].T).view(T, nh, dn + dv)  # eq. 2 and 5 (W^UK, W^UV)
    outs = []
    for i in range(nh):
        q = torch.cat([q_all[:, i, :dn], rope_complex(q_all[:, i, dn:], pos, inv_freq)], -1)
        k = torch.cat([kv_up[:, i, :dn], k_r], -1)
        v = kv_up[:, i, dn:]
        scores = q @ k.T / math.sqrt(dn + dr)  # eq. 10
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        outs.append(torch.softmax(scores, -1) @ v)
    return torch.cat(outs, -1) @ W["o_proj.weight"].T  # eq. 11


def test_mla_matches_paper_equations_in_float64():
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny")
    attn = MLA(config, layer_idx=0).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    rotary = RotaryEmbedding(config)
    T = 11
    h = torch.randn(2, T, config.hidden_size, dtype=torch.float64)
    cos, sin = rotary(torch.arange(T))
    ours = attn(h, cos.double(), sin.double())
    for b in range(2):
        ref = mla_reference(attn, h[b], rotary.inv_freq)
        torch.testing.assert_close(ours[b], ref, rtol=1e-5, atol=1e-6)


def test_mla_without_query_compression_matches_the_equations_with_q_proj():
    torch.manual_seed(2)
    config = ModelConfig.from_preset("tiny").replace(q_lora_rank=None)
    attn = MLA(config, 0).double()
    assert hasattr(attn, "q_proj") and not hasattr(attn, "q_a_proj")
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    rotary = RotaryEmbedding(config)
    cos, sin = rotary(torch.arange(5))
    h = torch.randn(1, 5, config.hidden_size, dtype=torch.float64)
    ours = attn(h, cos.double(), sin.double())
    torch.testing.assert_close(ours[0], mla_reference(attn, h[0], rotary.inv_freq), rtol=1e-5, atol=1e-6)


def test_cached_incremental_forward_equals_full_forward():
    torch.manual_seed(1)
    config = ModelConfig.from_preset("tiny")
    model = CausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(batch_size=2, max_length=16)
        prefill = model(ids[:, :7], cache=cache, start_pos=0).logits
        chunk = model(ids[:, 7:9], cache=cache, start_pos=7).logits  # 2 new tokens against a cached prefix
        steps = [model(ids[:, t : t + 1], cache=cache, start_pos=t).logits for t in range(9, 12)]
    stitched = torch.cat([prefill, chunk, *steps], dim=1)
    torch.testing.assert_close(stitched, full, rtol=1e-4, atol=1e-5)
    assert cache.length == 12


def test_latent_cache_holds_only_latent_and_shared_rope_key():
    """Paper check §16.5: per layer and token, kv_lora_rank + qk_rope_head_dim numbers, nothing per head."""
    config = ModelConfig.from_preset("small")
    model = CausalLM(config)
    cache = model.new_cache(batch_size=1, max_length=8, dtype=torch.bfloat16)
    expected = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 2
    assert cache.bytes_per_token() == expected


def test_materialised_attention_runs_on_the_fused_sdpa_kernel():
    """q/k heads (nope + rope) are wider than v heads; v is zero-padded so that SDPA's flash kernel (which never
    materialises the [S, T] scores per head) takes causal prefill: forced here (unequal head sizes make the
    flash-only backend raise), and the result is the math path's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_preset("tiny")).eval()
    assert model.config.v_head_dim < model.config.qk_nope_head_dim + model.config.qk_rope_head_dim
    ids = torch.randint(2, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.MATH):
            expected = model(ids, compute_mtp=False).logits
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            fused = model(ids, compute_mtp=False).logits
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)
