"""Tile/block quantisers: the scale rule by hand, error bounds per format, zero tiles, padding, a naive oracle."""

import math

import pytest
import torch

from latentmoe.fp8 import (
    AMAX_FLOOR,
    E4M3,
    E4M3_MAX,
    E5M2,
    E5M2_MAX,
    dequantize,
    fp8_format,
    quantize_blocks,
    quantize_blockwise,
    quantize_tensorwise,
    quantize_tiles,
    relative_error,
)
from latentmoe.fp8.formats import cast_to_fp8, pow2_ceil


def outlier_heavy(shape, seed=0, fraction=0.01, magnitude=1000.0):
    """Gaussian values with a few entries blown up by ``magnitude`` (like LLM activation outliers)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    mask = torch.rand(*shape, generator=gen) < fraction
    return torch.where(mask, x * magnitude, x)


def naive_quantize(x, rows, cols, fmt="e4m3", scale_fmt=None):
    """Per-block Python loop over the padded grid: the oracle for quantize_blockwise."""
    f = fp8_format(fmt)
    R, C = x.shape
    Rb, Cb = math.ceil(R / rows), math.ceil(C / cols)
    data = torch.empty(R, C, dtype=f.dtype)
    scales = torch.empty(Rb, Cb)
    for i in range(Rb):
        for j in range(Cb):
            blk = x[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols].float()
            s = max(float(blk.abs().max()), AMAX_FLOOR) / f.max
            if scale_fmt == "ue8m0":
                s = 2.0 ** math.ceil(math.log2(s))
            scales[i, j] = s
            data[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols] = (
                (blk / torch.tensor(s)).clamp(-f.max, f.max).to(f.dtype)
            )
    return data, scales


def test_tile_scale_is_amax_over_448_by_hand():
    x = torch.zeros(2, 256)
    x[0, 5] = -896.0  # tile (0, 0): amax 896 -> s = 2
    x[0, 130] = 44.8  # tile (0, 1): amax 44.8 -> s = 0.1
    x[1, 0] = 1e-6  # tile (1, 0): amax below the floor -> s = 1e-4 / 448
    q = quantize_tiles(x)
    assert q.scales.shape == (2, 2) and q.block == (1, 128)
    expected = torch.tensor([[2.0, 44.8 / 448], [AMAX_FLOOR / 448, AMAX_FLOOR / 448]])
    torch.testing.assert_close(q.scales, expected)
    assert q.data[0, 5].float() == -448.0  # the tile's max lands on E4M3's max
    assert q.data.float()[0, 130] == 448.0


def test_ue8m0_scales_round_up_to_powers_of_two():
    torch.testing.assert_close(
        pow2_ceil(torch.tensor([3.0, 4.0, 0.3, 1.0, 2.0**-20 * 1.5])), torch.tensor([4.0, 4.0, 0.5, 1.0, 2.0**-19])
    )
    x = torch.full((1, 128), 960.0)
    q = quantize_tiles(x, scale_fmt="ue8m0")
    assert q.scales.item() == 4.0  # 960/448 = 2.14 -> 4 (rounding up keeps |x/s| <= 448)
    assert q.data.float().max() == 240.0
    # a power-of-two scale makes dequantisation exact even in bf16
    y = outlier_heavy((8, 384))
    qq = quantize_tiles(y, scale_fmt="ue8m0")
    assert torch.equal(qq.dequantize(torch.bfloat16).float(), qq.dequantize(torch.float64).float())


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("kind", ["gaussian", "outliers"])
@pytest.mark.parametrize("granularity", ["tiles", "blocks"])
def test_dequantisation_error_within_the_format_bound(fmt, kind, granularity):
    # Round-to-nearest: |err| <= |x|·2^-(m+1) for normal values and <= s·(subnormal step)/2 below them.
    f = fp8_format(fmt)
    x = torch.randn(160, 300) if kind == "gaussian" else outlier_heavy((160, 300))
    q = quantize_tiles(x, fmt=fmt) if granularity == "tiles" else quantize_blocks(x, fmt=fmt)
    rows, cols = q.block
    s = q.scales.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:160, :300]
    err = (q.dequantize(torch.float64) - x.double()).abs()
    bound = x.double().abs() * f.relative_step / 2 + s.double() * f.subnormal_step / 2
    assert (err <= bound * (1 + 1e-6)).all()


def test_all_zero_tiles_give_zero_not_nan():
    x = torch.zeros(3, 200)
    x[1, 150] = 2.0
    for q in (quantize_tiles(x), quantize_blocks(x), quantize_tiles(x, fmt="e5m2", scale_fmt="ue8m0")):
        assert torch.isfinite(q.scales).all() and (q.scales > 0).all()
        torch.testing.assert_close(q.dequantize(), x)


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("shape", [(3, 300), (130, 200), (1, 64), (256, 128)])
def test_quantisers_match_the_naive_per_block_loop_including_padding(shape, scale_fmt):
    x = outlier_heavy(shape, seed=1)
    for rows, cols in ((1, 128), (128, 128)):
        q = quantize_blockwise(x, (rows, cols), scale_fmt=scale_fmt)
        data, scales = naive_quantize(x, rows, cols, scale_fmt=scale_fmt)
        assert q.data.shape == x.shape and q.data.dtype == torch.float8_e4m3fn
        assert q.scales.shape == (math.ceil(shape[0] / rows), math.ceil(shape[1] / cols))
        torch.testing.assert_close(q.scales, scales, rtol=0, atol=0)
        assert torch.equal(q.data.view(torch.uint8), data.view(torch.uint8))


def test_stacked_expert_weights_are_quantised_per_expert_and_1d_tiles_work():
    w = torch.randn(3, 200, 150)
    q = quantize_blocks(w)
    assert q.scales.shape == (3, 2, 2)
    for e in range(3):
        qe = quantize_blocks(w[e])
        assert torch.equal(q.data[e].view(torch.uint8), qe.data.view(torch.uint8))
        assert torch.equal(q.scales[e], qe.scales)
    v = torch.randn(300)
    qv = quantize_tiles(v)
    assert qv.data.shape == (300,) and qv.scales.shape == (3,)
    torch.testing.assert_close(dequantize(qv.data, qv.scales, (1, 128)), quantize_tiles(v[None]).dequantize()[0])


def test_fine_grained_scaling_beats_per_tensor_scaling_on_outliers():
    # paper.md §16 check 16 (qualitative): per-tile error stays far below per-tensor FP8 with outliers.
    # A 10^4 outlier pushes a per-tensor scale so high that ordinary values reach E4M3's subnormals.
    x = outlier_heavy((256, 1024), fraction=0.001, magnitude=1e4)
    tile, tensor = quantize_tiles(x).dequantize(), quantize_tensorwise(x).dequantize()
    assert relative_error(tile, x) < relative_error(tensor, x) / 4
    ordinary = x.abs() < 10
    assert relative_error(tile[ordinary], x[ordinary]) < relative_error(tensor[ordinary], x[ordinary])


def test_cast_saturates_explicitly_for_both_formats():
    big = torch.tensor([1000.0, -1e6, float("inf"), 3.0])
    assert cast_to_fp8(big, "e4m3").float().tolist() == [E4M3_MAX, -E4M3_MAX, E4M3_MAX, 3.0]
    assert cast_to_fp8(big, "e5m2").float().tolist() == [1024.0, -E5M2_MAX, E5M2_MAX, 3.0]
    assert E4M3.max == torch.finfo(E4M3.dtype).max and E5M2.max == torch.finfo(E5M2.dtype).max
    assert 2.0**E4M3.min_normal_exponent == torch.finfo(E4M3.dtype).smallest_normal
    assert 2.0**E5M2.min_normal_exponent == torch.finfo(E5M2.dtype).smallest_normal


def test_e5m2_option_is_coarser_than_e4m3_on_gaussians():
    x = torch.randn(64, 512)
    e4 = relative_error(quantize_tiles(x, fmt="e4m3").dequantize(), x)
    e5 = relative_error(quantize_tiles(x, fmt="e5m2").dequantize(), x)
    assert e4 < e5 < 0.1


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="e4m3"):
        quantize_tiles(torch.ones(4, 4), fmt="e3m4")
    with pytest.raises(ValueError, match="ue8m0"):
        quantize_tiles(torch.ones(4, 4), scale_fmt="e8m0")
    with pytest.raises(ValueError, match="matrix"):
        quantize_blocks(torch.ones(4))
    with pytest.raises(ValueError, match="do not fit"):
        dequantize(torch.zeros(4, 256, dtype=torch.float8_e4m3fn), torch.ones(4, 3), (1, 128))
