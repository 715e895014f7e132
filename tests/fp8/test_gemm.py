"""Blockwise FP8 GEMM: float64 oracle, layouts of the three training GEMMs, promotion and the limited accumulator."""

import pytest
import torch

from latentmoe.fp8 import (
    GemmPath,
    blockwise_matmul,
    blockwise_matmul_dequant,
    blockwise_matmul_emulated,
    blockwise_matmul_reference,
    blockwise_matmul_with_path,
    limited_precision_matmul,
    quantize_blocks,
    quantize_tensorwise,
    quantize_tiles,
    relative_error,
    scaled_mm_blockwise_available,
)
from latentmoe.fp8.gemm import scale_block
from tests.reference.fp8 import fake_quantize, limited_dot

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


def test_cpu_gemms_report_the_emulated_path():
    xq, wq, _, _ = operands(8, 256, 16)
    result = blockwise_matmul_with_path(xq.data, xq.scales, wq.data, wq.scales)
    assert result.path is GemmPath.EMULATED
    assert torch.equal(result.out, blockwise_matmul(xq.data, xq.scales, wq.data, wq.scales))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_is_the_one_the_capability_promises_and_matches_the_cpu_emulation():
    """On a GPU that offers blockwise scaled_mm (Hopper+, a torch that has it) that path must be the one that
    ran: a silent fallback to dequantise + BF16 matmul fails here instead of passing on numbers alone."""
    xq, wq, _, _ = operands(256, 512, 384)
    cpu = blockwise_matmul(xq.data, xq.scales, wq.data, wq.scales)
    dev = torch.device("cuda")
    gpu = blockwise_matmul_with_path(xq.data.to(dev), xq.scales.to(dev), wq.data.to(dev), wq.scales.to(dev))
    expected = GemmPath.SCALED_MM if scaled_mm_blockwise_available(dev) else GemmPath.DEQUANT
    assert gpu.path is expected
    assert gpu.out.device.type == "cuda"
    assert relative_error(gpu.out.cpu(), cpu) < 1e-2  # bf16 output (scaled_mm) or bf16 operands (fallback)
    # a simulated accumulator is never a GPU kernel: it runs the emulation wherever the data lives
    small_x, small_w, _, _ = operands(4, 256, 8)
    sim = blockwise_matmul_with_path(small_x.data.to(dev), small_x.scales.to(dev), small_w.data.to(dev),
                                     small_w.scales.to(dev), fraction_bits=13)
    assert sim.path is GemmPath.EMULATED


def test_no_gpu_means_no_scaled_mm_path():
    assert not scaled_mm_blockwise_available("cpu")


def promoted_reference(a, b, *, fraction_bits, keep_sum_limited=False):
    """Σ over 128-element chunks of limited_dot(chunk) · s_a · s_b, in float64 (TR §3.3.2, Fig. 7b).

    ``keep_sum_limited`` models the bug the promotion exists to avoid: the running sum over chunks also kept
    in the limited register (cut to ``fraction_bits`` bits after every chunk).
    """
    out = torch.zeros(a.q.shape[0], b.q.shape[0], dtype=torch.float64)
    qa, qb = a.q.double().tolist(), b.q.double().tolist()
    K = a.q.shape[1]
    for m in range(out.shape[0]):
        for n in range(out.shape[1]):
            acc = 0.0
            for kb, k0 in enumerate(range(0, K, 128)):
                chunk = limited_dot(qa[m][k0 : k0 + 128], qb[n][k0 : k0 + 128], fraction_bits=fraction_bits)
                acc += chunk * float(a.scales[m, kb]) * float(b.scales[n // 128, kb])
                if keep_sum_limited:
                    acc = limited_dot([acc], [1.0], fraction_bits=fraction_bits)
            out[m, n] = acc
    return out


def test_simulated_tensor_core_sums_each_chunk_in_13_bits_and_promotes_to_fp32():
    """blockwise_matmul(fraction_bits=13) = per 128-wide chunk a 13-bit tensor-core sum, then FP32 scaling and
    accumulation: equal to the scalar reference to FP32 accuracy, and measurably not what a limited register
    keeping the promoted sums would give (positive data: the sum grows over 16 chunks)."""
    g = torch.Generator().manual_seed(21)
    x, w = torch.rand(2, 2048, generator=g) + 0.5, torch.rand(3, 2048, generator=g) + 0.5
    a, b = fake_quantize(x, 1, 128), fake_quantize(w, 128, 128)
    sim = blockwise_matmul(a.q, a.scales, b.q, b.scales, fraction_bits=13)
    ref = promoted_reference(a, b, fraction_bits=13)
    assert relative_error(sim, ref) < FP32_ACCURACY
    assert relative_error(promoted_reference(a, b, fraction_bits=13, keep_sum_limited=True), ref) > 20 * FP32_ACCURACY
    # and the 13-bit chunk sums themselves are visible: the ideal tensor core gives another result
    ideal = blockwise_matmul_reference(a.q, a.scales, b.q, b.scales)
    assert relative_error(ideal, ref) > 20 * FP32_ACCURACY
