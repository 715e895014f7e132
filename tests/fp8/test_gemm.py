"""Blockwise FP8 GEMM: float64 oracle, layouts of the three training GEMMs, promotion and the limited accumulator."""

import pytest
import torch

from latentmoe.fp8 import (
    blockwise_matmul,
    blockwise_matmul_dequant,
    blockwise_matmul_emulated,
    blockwise_matmul_reference,
    limited_precision_matmul,
    quantize_blocks,
    quantize_tensorwise,
    quantize_tiles,
    relative_error,
    scaled_mm_blockwise_available,
)
from latentmoe.fp8.gemm import scale_block

FP32_ACCURACY = 1e-6  # a few FP32 roundings per output (chunk sum, scaling, accumulation) on K <= 1024


def operands(M, K, N, seed=0, scale_fmt=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen) * torch.linspace(0.01, 10, K)  # columns of very different size
    w = torch.randn(N, K, generator=gen) * 0.05
    return quantize_tiles(x, scale_fmt=scale_fmt), quantize_blocks(w, scale_fmt=scale_fmt), x, w


@pytest.mark.parametrize("shape", [(64, 256, 128), (130, 300, 200), (1, 64, 3), (5, 1024, 257)])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_blockwise_gemm_equals_float64_on_the_dequantised_operands(shape, scale_fmt):
    xq, wq, x, w = operands(*shape, scale_fmt=scale_fmt)
    ref = blockwise_matmul_reference(xq.data, xq.scales, wq.data, wq.scales)
    y = blockwise_matmul(xq.data, xq.scales, wq.data, wq.scales)
    assert y.dtype == torch.float32 and y.shape == (shape[0], shape[2])
    assert relative_error(y, ref) < FP32_ACCURACY
    assert relative_error(y, x.double() @ w.double().T) < 0.06  # and it is an FP8 approximation of x·Wᵀ


def test_the_dgrad_and_wgrad_layouts_also_match_the_oracle():
    M, K, N = 200, 256, 384
    gen = torch.Generator().manual_seed(3)
    dy, x, w = torch.randn(M, N, generator=gen), torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen)
    # Dgrad: dy [M, N] tiles along N · Wᵀ [K, N] = the forward's 128x128 blocks, transposed.
    dyq, wq = quantize_tiles(dy), quantize_blocks(w)
    w_KN, s_KbNb = wq.data.t().contiguous(), wq.scales.t().contiguous()
    assert scale_block(w_KN.shape, s_KbNb) == (128, 128)
    dx = blockwise_matmul(dyq.data, dyq.scales, w_KN, s_KbNb)
    assert relative_error(dx, blockwise_matmul_reference(dyq.data, dyq.scales, w_KN, s_KbNb)) < FP32_ACCURACY
    # Wgrad: dyᵀ [N, M] and xᵀ [K, M], both in 1x128 tiles along the token dimension M (not a multiple of 128).
    dyq_t, xq_t = quantize_tiles(dy.t()), quantize_tiles(x.t())
    assert scale_block(xq_t.data.shape, xq_t.scales) == (1, 128) and xq_t.scales.shape == (K, 2)
    dw = blockwise_matmul(dyq_t.data, dyq_t.scales, xq_t.data, xq_t.scales)
    assert relative_error(dw, blockwise_matmul_reference(dyq_t.data, dyq_t.scales, xq_t.data, xq_t.scales)) < (
        FP32_ACCURACY
    )
    assert relative_error(dw, dy.double().T @ x.double()) < 0.06


def test_promoting_more_often_changes_nothing_but_rounding():
    xq, wq, _, _ = operands(32, 512, 64)
    ref = blockwise_matmul_reference(xq.data, xq.scales, wq.data, wq.scales)
    for every in (32, 64, 128):
        assert relative_error(blockwise_matmul(xq.data, xq.scales, wq.data, wq.scales, promote_every=every), ref) < (
            FP32_ACCURACY
        )
    with pytest.raises(ValueError, match="promote_every"):
        blockwise_matmul(xq.data, xq.scales, wq.data, wq.scales, promote_every=96)
    with pytest.raises(ValueError, match="promoted"):  # tile scales change along K: no promotion is impossible
        blockwise_matmul(xq.data, xq.scales, wq.data, wq.scales, promote_every=None)


def test_dequantising_bf16_path_is_close_to_the_exact_one():
    xq, wq, _, _ = operands(96, 384, 160)
    exact = blockwise_matmul(xq.data, xq.scales, wq.data, wq.scales)
    fast = blockwise_matmul_dequant(xq.data, xq.scales, wq.data, wq.scales)
    assert relative_error(fast, exact) < 1e-2  # one bf16 rounding of each dequantised operand and of the output


def test_limited_accumulator_golden_example():
    # 1 + 63 · 2^-14 summed 32 products at a time: with 13 fraction bits every 2^-14 is truncated away
    # after alignment to the running sum's exponent; with 14 bits all of them survive.
    a = torch.ones(1, 64)
    b = torch.full((1, 64), 2.0**-14)
    b[0, 0] = 1.0
    assert limited_precision_matmul(a, b, fraction_bits=13).item() == 1.0
    assert limited_precision_matmul(a, b, fraction_bits=14).item() == 1.0 + 63 * 2.0**-14
    x = torch.randn(4, 100)
    y = torch.randn(3, 100)
    torch.testing.assert_close(limited_precision_matmul(x, y, fraction_bits=52), x.double() @ y.double().T)


def test_promotion_beats_a_limited_accumulator_at_large_k():
    # paper.md §16 check 17: 13 fraction bits, K = 4096, per-tensor scaled FP8 inputs (so no promotion is possible).
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(8, 4096, generator=gen), torch.rand(8, 4096, generator=gen)
    aq, bq = quantize_tensorwise(a), quantize_tensorwise(b)
    ref = blockwise_matmul_reference(aq.data, aq.scales, bq.data, bq.scales)
    kw = dict(fraction_bits=13)
    no_promotion = blockwise_matmul_emulated(aq.data, aq.scales, bq.data, bq.scales, promote_every=None, **kw)
    promoted = blockwise_matmul_emulated(aq.data, aq.scales, bq.data, bq.scales, promote_every=128, **kw)
    err_none, err_promoted = relative_error(no_promotion, ref), relative_error(promoted, ref)
    assert err_none > 0.01  # the TR's "nearly 2%" order of magnitude
    assert err_promoted < err_none / 20
    # and fine-grained scaled operands with the simulated tensor core stay close to the oracle when promoted
    xq, wq, _, _ = operands(4, 1024, 8)
    sim = blockwise_matmul(xq.data, xq.scales, wq.data, wq.scales, fraction_bits=13)
    assert relative_error(sim, blockwise_matmul_reference(xq.data, xq.scales, wq.data, wq.scales)) < 1e-3


def test_scale_grids_that_fit_nothing_are_rejected():
    xq, wq, _, _ = operands(8, 256, 16)
    with pytest.raises(ValueError, match="scale rows"):
        blockwise_matmul(xq.data, xq.scales[:5], wq.data, wq.scales)
    with pytest.raises(ValueError, match="reduced dimensions"):
        blockwise_matmul(xq.data, xq.scales, wq.data[:, :128], wq.scales)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_matches_the_cpu_emulation():
    xq, wq, _, _ = operands(256, 512, 384)
    cpu = blockwise_matmul(xq.data, xq.scales, wq.data, wq.scales)
    dev = torch.device("cuda")
    gpu = blockwise_matmul(xq.data.to(dev), xq.scales.to(dev), wq.data.to(dev), wq.scales.to(dev))
    assert gpu.device.type == "cuda"
    assert relative_error(gpu.cpu(), cpu) < 1e-2  # bf16 output (scaled_mm) or bf16 operands (fallback)
    assert isinstance(scaled_mm_blockwise_available(dev), bool)


def test_no_gpu_means_no_scaled_mm_path():
    assert not scaled_mm_blockwise_available("cpu")
