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


@pytest.mark.parametrize(
    "recipe", [FP8Recipe(grad_fmt="e5m2"), FP8Recipe(scale_fmt="ue8m0"), FP8Recipe(gemm="dequant")]
)
def test_recipe_variants_train_the_same_layer(recipe):
    (ref, fp8), *_ = fp32_and_fp8_grads(64, 256, 128, recipe=recipe)
    assert relative_error(fp8[0], ref[0]) < FORWARD_TOL
    assert relative_error(fp8[1][1], ref[1][1]) < GRAD_TOL  # E5M2 gradients are one bit coarser: ≈ 6 %


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
