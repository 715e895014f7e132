"""convert_to_fp8 on a CausalLM: which GEMMs become FP8, what stays high precision, state dicts unchanged."""

import copy

import torch
from torch import nn

from latentmoe import CausalLM, ModelConfig
from latentmoe.fp8 import FP8Linear, FP8Matmul, convert_to_fp8, fp8_modules, relative_error
from latentmoe.model.moe import Experts, Router
from latentmoe.model.norm import RMSNorm
from tests.reference.fp8 import blocks, tiles
from tests.reference.moe import experts_reference


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


def fp8_forward_reference(x_NI, weight_OI):
    """x·Wᵀ from x's 1x128 tiles and W's 128x128 blocks (float64 read-back), rounded to FP32 like an FP8 GEMM out."""
    return (tiles(x_NI) @ blocks(weight_OI).T).float()


def fp8_experts(n_experts=4, hidden=256, width=128, seed=0):
    torch.manual_seed(seed)
    experts = Experts(n_experts, hidden, width)
    for w in experts.parameters():
        nn.init.normal_(w, std=0.1)
    experts.expert_linear = FP8Matmul()
    T = 24
    x = torch.randn(T, hidden) * torch.linspace(0.1, 4, hidden)  # channels of different size: tiles matter
    idx = torch.stack([torch.randperm(n_experts)[:2] for _ in range(T)])
    weight = torch.rand(T, 2)
    return experts, x, idx, weight


def test_fp8_routed_experts_equal_the_fp8_reference_and_differ_from_full_precision():
    """Two-sided: the grouped FP8 experts agree with a per-token loop whose every matmul quantises its
    operands (1x128 tiles, 128x128 blocks, float64 products), and are measurably not the unquantised FFN."""
    experts, x, idx, weight = fp8_experts()
    with torch.no_grad():
        out = experts(x, idx, weight).double()
        params = (experts.gate_proj, experts.up_proj, experts.down_proj)
        fp8_ref = experts_reference(*params, x, idx, weight, linear=fp8_forward_reference).double()
        exact = experts_reference(*(p.double() for p in params), x.double(), idx, weight.double())
    # The SwiGLU product between the GEMMs is FP32 here and float64-then-FP32 in the reference, so a few of
    # its values may round to a neighbouring E4M3 value: far below the FP8 error itself.
    assert relative_error(out, fp8_ref) < 2e-3
    assert relative_error(out, exact) > 1e-2  # E4M3 keeps 4 significant bits: ~3 % off the exact FFN
    assert relative_error(fp8_ref, exact) > 1e-2


def test_fp8_routed_experts_save_only_fp8_operands_for_their_gemms():
    """What backward keeps of the expert GEMMs: per projection the FP8 weight + block scales and the FP8 input
    (tiled along tokens) + tile scales. No high-precision copy of a weight or of the dispatched input."""
    experts, x, idx, weight = fp8_experts()
    x.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = experts(x, idx, weight)
    active = int((torch.bincount(idx.flatten(), minlength=experts.n_experts) > 0).sum())
    fp8 = [t for t in saved if t.dtype == torch.float8_e4m3fn]
    assert len(fp8) == 2 * 3 * active  # (weight, input) for gate, up and down of every active expert
    weight_shapes = {tuple(experts.gate_proj.shape[1:]), tuple(experts.down_proj.shape[1:])}
    assert sorted({tuple(t.shape) for t in fp8 if t.dim() == 2 and tuple(t.shape) in weight_shapes}) == sorted(
        weight_shapes
    )
    high = [t for t in saved if t.is_floating_point() and t.dtype != torch.float8_e4m3fn]
    assert not [t for t in high if tuple(t.shape) in weight_shapes], "a high-precision weight copy is saved"
    hidden = x.shape[1]
    dispatched = [t for t in high if t.dim() == 2 and t.shape[1] == hidden and t.shape[0] < idx.numel()]
    assert not dispatched, "a high-precision copy of an expert's input rows is saved"
    out.sum().backward()
    assert x.grad is not None and experts.gate_proj.grad.dtype == torch.float32
