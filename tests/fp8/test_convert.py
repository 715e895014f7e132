"""convert_to_fp8 on a CausalLM: which GEMMs become FP8, what stays high precision, state dicts unchanged."""

import copy

import torch
from torch import nn

from latentmoe import CausalLM, ModelConfig
from latentmoe.fp8 import FP8Linear, FP8Matmul, convert_to_fp8, fp8_modules, relative_error
from latentmoe.model.moe import Experts, Router, experts_reference
from latentmoe.model.norm import RMSNorm


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return CausalLM(ModelConfig.from_preset("tiny"))


def test_linear_layers_and_routed_experts_become_fp8_while_head_router_norms_stay():
    model = tiny_model()
    report = convert_to_fp8(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, module in linears.items():
        expected_fp8 = name.split(".")[-1] not in ("lm_head", "eh_proj")
        assert isinstance(module, FP8Linear) == expected_fp8, name
    assert sorted(report.kept) == ["lm_head", "mtp.0.eh_proj"]
    assert "model.layers.0.self_attn.kv_b_proj" in report.linears and "model.layers.0.mlp.down_proj" in report.linears
    assert "model.layers.1.mlp.shared_experts.up_proj" in report.linears
    experts = [n for n, m in model.named_modules() if isinstance(m, Experts)]
    assert report.experts == experts == ["model.layers.1.mlp.experts", "mtp.0.block.mlp.experts"]
    assert all(isinstance(m.expert_linear, FP8Matmul) for m in model.modules() if isinstance(m, Experts))
    # the embedding, router and norms are untouched modules of their own types
    assert type(model.model.embed_tokens) is nn.Embedding
    assert all(type(m) in (Router, RMSNorm) for m in model.modules() if isinstance(m, Router | RMSNorm))
    assert set(fp8_modules(model)) == set(report.linears) | set(report.experts)
    again = convert_to_fp8(model)
    assert again.linears == [] and again.experts == []


def test_mtp_projection_is_quantised_by_choice():
    model = tiny_model()
    convert_to_fp8(model, keep=("lm_head",))
    assert isinstance(model.mtp[0].eh_proj, FP8Linear)


def test_state_dict_is_unchanged_and_loads_into_an_unconverted_model():
    model = tiny_model()
    params_before = {n: p for n, p in model.named_parameters()}
    shapes_before = {k: (v.dtype, v.shape) for k, v in model.state_dict().items()}
    convert_to_fp8(model)
    assert {k: (v.dtype, v.shape) for k, v in model.state_dict().items()} == shapes_before
    assert all(p is params_before[n] for n, p in model.named_parameters())  # an optimizer built before still works
    plain = tiny_model(seed=1)
    plain.load_state_dict(model.state_dict(), strict=True)
    for (n, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_fp8_logits_track_the_bf16_model():
    model = tiny_model()
    fp8 = copy.deepcopy(model)
    convert_to_fp8(fp8)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = model(ids), fp8(ids)
    assert relative_error(out.logits, ref.logits) < 0.05
    assert relative_error(out.mtp_logits[0], ref.mtp_logits[0]) < 0.05


def test_grouped_fp8_experts_match_the_per_token_loop():
    torch.manual_seed(0)
    experts = Experts(8, 64, 32)
    for w in experts.parameters():
        nn.init.normal_(w, std=0.1)
    experts.expert_linear = FP8Matmul()
    x = torch.randn(20, 64)
    idx = torch.randint(0, 8, (20, 2))
    weight = torch.rand(20, 2)
    # A token's 1x128 tiles and an expert's 128x128 blocks do not depend on the batch: the same FP8 numbers.
    torch.testing.assert_close(
        experts(x, idx, weight), experts_reference(experts, x, idx, weight), rtol=1e-5, atol=1e-6
    )
