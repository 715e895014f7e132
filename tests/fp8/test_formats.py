"""FP8 scale rule, rounding helpers and quantisation edge cases, by hand (gaps found by make mutants)."""

import pytest
import torch

from latentmoe.fp8.formats import cast_to_fp8, pow2_ceil, scales_from_amax
from latentmoe.fp8.quant import dequantize, quantize_blocks, quantize_blockwise, quantize_tensorwise
from tests.reference.fp8 import fake_quantize


def test_pow2_ceil_by_hand_including_exact_powers():
    x = torch.tensor([3.0, 4.0, 0.3, 1.0, 2.0**-10, 5.0])
    assert pow2_ceil(x).tolist() == [4.0, 4.0, 0.5, 1.0, 2.0**-10, 8.0]


def test_defaults_are_deepseeks_e4m3_with_fp32_scales():
    """s = max(amax, 1e-4) / 448 by default (E4M3, no power-of-two rounding); the cast is E4M3, saturating."""
    amax = torch.tensor([448.0, 896.0, 0.0])
    assert scales_from_amax(amax).tolist() == [1.0, 2.0, torch.tensor(1e-4 / 448).item()]
    q = cast_to_fp8(torch.tensor([1000.0, -3.0, 0.1]))
    assert q.dtype == torch.float8_e4m3fn and q.float().tolist() == [448.0, -3.0, 0.1015625]


def test_stacked_matrices_quantise_and_dequantise_per_matrix():
    """[E, N, K] expert stacks: blocks and per-tensor scales per matrix, and the read-back has the input's shape
    and the requested dtype (the loops of tests/reference/fp8.py, matrix by matrix, are the reference)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 130, 200, generator=g) * torch.tensor([0.01, 1.0, 100.0])[:, None, None]
    q = quantize_blocks(w, 128)
    assert q.data.shape == w.shape and q.scales.shape == (3, 2, 2)
    back = q.dequantize(torch.bfloat16)
    assert back.dtype == torch.bfloat16 and back.shape == w.shape
    for e in range(3):
        want = fake_quantize(w[e], 128, 128)
        assert torch.equal(q.scales[e], want.scales)
        assert torch.equal(dequantize(q.data, q.scales, (128, 128), dtype=torch.float64)[e], want.values)
    t = quantize_tensorwise(w, fmt="e5m2", scale_fmt="ue8m0")
    assert t.scales.shape == (3, 1, 1) and t.data.dtype == torch.float8_e5m2
    assert torch.equal(t.scales.flatten(), pow2_ceil(w.abs().amax(dim=(1, 2)) / 57344.0))


def test_scale_and_format_options_reach_blocks_and_tensorwise_quantisation():
    w = torch.randn(128, 128, generator=torch.Generator().manual_seed(1)) * 3
    for q in (quantize_blocks(w, scale_fmt="ue8m0"), quantize_tensorwise(w, scale_fmt="ue8m0")):
        assert torch.equal(q.scales, pow2_ceil(q.scales))  # powers of two
    assert quantize_tensorwise(w, fmt="e5m2").data.dtype == torch.float8_e5m2


def test_block_shapes_must_be_positive_and_one_wide_blocks_work():
    x = torch.randn(4, 6)
    for bad in ((0, 2), (2, 0)):
        with pytest.raises(ValueError, match="block must be positive"):
            quantize_blockwise(x, bad)
    q = quantize_blockwise(x, (2, 1))  # one scale per 2 rows of a single column
    assert q.scales.shape == (2, 6)
    assert torch.equal(q.dequantize(torch.float64), fake_quantize(x, 2, 1).values)
