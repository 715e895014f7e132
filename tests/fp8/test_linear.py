"""FP8Linear: its three GEMMs use the documented layouts, gradients track fp32, only FP8 is saved for backward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latentmoe.fp8 import (
    FP8Linear,
    FP8Matmul,
    FP8Recipe,
    blockwise_matmul_reference,
    dequantize,
    fp8_linear,
    quantize_blocks,
    quantize_tiles,
    relative_error,
)
from tests.reference.fp8 import fp8_linear_reference

# E4M3 keeps 4 significant bits: each quantised operand is off by up to 2^-4 relative (≈ 2.5 % rms on
# Gaussian data), and a GEMM's relative error is about the two operands' errors combined (≈ 3.7 %).
# dx has two quantised operands (dy, W); dW has dy re-quantised and x quantised twice (saved tiles,
# then re-tiled along tokens). Hence 6 % on the output and 8 % on the gradients.
FORWARD_TOL = 0.06
GRAD_TOL = 0.08


def fp32_and_fp8_grads(M, K, N, *, bias=True, recipe=None, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    x = torch.randn(M, K)
    dy = torch.randn(M, N)
    results = []
    for module in (lin, FP8Linear.from_linear(lin, recipe)):
        xx = x.clone().requires_grad_()
        y = module(xx)
        y.backward(dy)
        grads = [xx.grad, lin.weight.grad.clone()] + ([lin.bias.grad.clone()] if bias else [])
        results.append((y.detach(), grads))
        lin.zero_grad(set_to_none=True)
    return results, x, dy, lin


@pytest.mark.parametrize("shape", [(64, 256, 128), (37, 100, 70), (300, 192, 256)])
def test_fp8_linear_output_and_gradients_track_fp32(shape):
    (ref, fp8), *_ = fp32_and_fp8_grads(*shape)
    assert relative_error(fp8[0], ref[0]) < FORWARD_TOL
    for g8, g32, name in zip(fp8[1], ref[1], ("dx", "dW", "db"), strict=True):
        assert relative_error(g8, g32) < GRAD_TOL, name
    torch.testing.assert_close(fp8[1][2], ref[1][2])  # the bias gradient is an fp32 sum of dy


@pytest.mark.parametrize("retile", [False, True])
def test_the_three_gemms_use_the_documented_layouts(retile):
    """Fprop x·Wᵀ (1x128 tiles x 128x128 blocks), Dgrad dy·W (dy tiles along N, W blocks transposed),
    Wgrad dyᵀ·x (both tiled along tokens; xᵀ quantised from x in the forward, or re-tiled from the Fprop
    tiles with ``retile_for_wgrad``) — each to fp32 accuracy against float64."""
    recipe = FP8Recipe(retile_for_wgrad=retile)
    (_, (y, (dx, dw, _))), x, dy, lin = fp32_and_fp8_grads(200, 256, 384, recipe=recipe)
    xq, wq = quantize_tiles(x), quantize_blocks(lin.weight.detach())
    y_ref = blockwise_matmul_reference(xq.data, xq.scales, wq.data, wq.scales) + lin.bias.double()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    dyq = quantize_tiles(dy)
    dx_ref = blockwise_matmul_reference(dyq.data, dyq.scales, wq.data.t().contiguous(), wq.scales.t().contiguous())
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-5, atol=1e-5)
    x_wgrad = dequantize(xq.data, xq.scales, (1, 128)) if retile else x
    dyq_t, xq_t = quantize_tiles(dy.t()), quantize_tiles(x_wgrad.t())
    dw_ref = blockwise_matmul_reference(dyq_t.data, dyq_t.scales, xq_t.data, xq_t.scales)
    torch.testing.assert_close(dw.double(), dw_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("retile", [False, True])
def test_only_fp8_tensors_and_their_scales_are_saved_for_backward(retile):
    lin = FP8Linear(256, 384, bias=False, recipe=FP8Recipe(retile_for_wgrad=retile))
    x = torch.randn(2, 64, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lin(x)
    dtypes = sorted(str(t.dtype) for t in saved)
    assert dtypes == ["torch.float32", "torch.float32", "torch.float8_e4m3fn", "torch.float8_e4m3fn"]
    by_shape = {tuple(t.shape): t for t in saved}
    if retile:  # the Fprop tiles: x [M=128, K=256], one scale per 1x128 tile along K
        assert by_shape[(128, 256)].dtype == torch.float8_e4m3fn and by_shape[(128, 2)].dtype == torch.float32
    else:  # Wgrad's operand: xᵀ [K=256, M=128], one scale per 1x128 tile along the tokens
        assert by_shape[(256, 128)].dtype == torch.float8_e4m3fn and by_shape[(256, 1)].dtype == torch.float32
    assert by_shape[(384, 256)].dtype == torch.float8_e4m3fn  # the weight's FP8 copy (autocast keeps a bf16 one)
    assert by_shape[(3, 2)].dtype == torch.float32  # one scale per 128x128 weight block
    y.sum().backward()
    assert x.grad.shape == x.shape and lin.weight.grad.dtype == torch.float32


def test_a_frozen_weight_saves_no_activation():
    lin = FP8Linear(256, 128, bias=False)
    lin.weight.requires_grad_(False)
    x = torch.randn(16, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lin(x)
    assert sorted(tuple(t.shape) for t in saved) == [(1, 2), (128, 256)]  # the FP8 weight and its scales
    y.sum().backward()
    assert x.grad is not None and lin.weight.grad is None


def test_autocast_output_is_bf16_and_master_weights_stay_fp32():
    lin = FP8Linear(128, 64)
    x = torch.randn(4, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert lin.weight.dtype == lin.weight.grad.dtype == torch.float32
    assert fp8_linear(x.detach(), lin.weight).dtype == torch.float32  # outside autocast: the input's dtype


def test_from_linear_shares_parameters_and_state_dict():
    lin = nn.Linear(100, 30)
    f = FP8Linear.from_linear(lin)
    assert f.weight is lin.weight and f.bias is lin.bias
    assert f.state_dict().keys() == lin.state_dict().keys()
    assert all(t.dtype == torch.float32 for t in f.state_dict().values())
    assert "fp8=e4m3/e4m3" in repr(f)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


RECIPE_CASES = {
    # option: (recipe, reference options, which of y / dx / dW the option changes)
    "grad_fmt=e5m2": (FP8Recipe(grad_fmt="e5m2"), dict(grad_fmt="e5m2"), ("dx", "dw")),
    "fmt=e5m2": (FP8Recipe(fmt="e5m2"), dict(fmt="e5m2"), ("y", "dx", "dw")),
    "scale_fmt=ue8m0": (FP8Recipe(scale_fmt="ue8m0"), dict(ue8m0=True), ("y", "dx", "dw")),
    "retile_for_wgrad": (FP8Recipe(retile_for_wgrad=True), dict(retile_for_wgrad=True), ("dw",)),
    "tile=block=256": (FP8Recipe(tile=256, block=256), dict(tile=256), ("y", "dx", "dw")),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_each_recipe_option_changes_the_gemms_exactly_as_the_reference_says(case):
    """Two-sided, per FP8Recipe option: y, dx and dW equal the float64 reference built with that option (to FP32
    accuracy), and the gradients the option touches differ from the default recipe's reference — so an option
    the layer ignored would fail here."""
    recipe, ref_kw, touched = RECIPE_CASES[case]
    M, K, N = 200, 256, 384
    g = torch.Generator().manual_seed(11)
    x = torch.randn(M, K, generator=g) * torch.linspace(0.05, 3, K)
    w = torch.randn(N, K, generator=g) * 0.05
    dy = torch.randn(M, N, generator=g) * 1e-3  # small, as gradients are: subnormal territory for E4M3 tiles
    weight = nn.Parameter(w.clone())
    xx = x.clone().requires_grad_()
    y = fp8_linear(xx, weight, None, recipe)
    y.backward(dy)
    got = {"y": y.detach(), "dx": xx.grad, "dw": weight.grad}
    want = vars(fp8_linear_reference(x, w, dy, **ref_kw))
    default = vars(fp8_linear_reference(x, w, dy))
    for name in ("y", "dx", "dw"):
        assert rel(got[name], want[name]) < 1e-5, f"{name} is not the {case} reference"
        if name in touched:
            assert rel(want[name], default[name]) > 1e-3, f"{case} should change {name}"
        else:
            assert rel(want[name], default[name]) == 0


def test_default_recipe_equals_the_reference():
    M, K, N = 130, 300, 200
    g = torch.Generator().manual_seed(12)
    x, w, dy = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.05, torch.randn(M, N, generator=g)
    weight = nn.Parameter(w.clone())
    xx = x.clone().requires_grad_()
    y = fp8_linear(xx, weight)
    y.backward(dy)
    want = fp8_linear_reference(x, w, dy)
    for got, ref in ((y, want.y), (xx.grad, want.dx), (weight.grad, want.dw)):
        assert rel(got, ref) < 1e-5


def test_dequant_gemm_rounds_operands_to_bf16_where_the_exact_gemm_does_not():
    """gemm="dequant": both operands read back to BF16 and one BF16 matmul (BF16 out). Against a float64
    reference of the same quantised operands it is off by BF16 rounding (~1e-3), the exact path by FP32's."""
    g = torch.Generator().manual_seed(13)
    x, w = torch.randn(96, 384, generator=g), torch.randn(160, 384, generator=g) * 0.05
    ref = fp8_linear_reference(x, w, torch.zeros(96, 160)).y
    exact = fp8_linear(x, w, None, FP8Recipe())
    dequant = fp8_linear(x, w, None, FP8Recipe(gemm="dequant"))
    assert rel(exact, ref) < 1e-6
    assert 3e-4 < rel(dequant, ref) < 1e-2


def test_fp8_matmul_is_the_expert_hook_signature():
    x, w = torch.randn(10, 64), torch.randn(32, 64)
    assert relative_error(FP8Matmul()(x, w), F.linear(x, w)) < FORWARD_TOL


def test_recipe_rejects_what_the_gemm_cannot_do():
    with pytest.raises(ValueError, match="gemm"):
        FP8Recipe(gemm="fast")
    with pytest.raises(ValueError, match="tile"):
        FP8Recipe(tile=64)
    with pytest.raises(ValueError, match="e4m3"):
        FP8Recipe(fmt="fp8")
