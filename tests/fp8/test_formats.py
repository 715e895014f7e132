"""The FP8 formats' scale rule and rounding helpers by hand (gaps found by make mutants)."""

import torch

from latentmoe.fp8.formats import cast_to_fp8, pow2_ceil, scales_from_amax


def test_pow2_ceil_by_hand_including_exact_powers():
    x = torch.tensor([3.0, 4.0, 0.3, 1.0, 2.0**-10, 5.0])
    assert pow2_ceil(x).tolist() == [4.0, 4.0, 0.5, 1.0, 2.0**-10, 8.0]


def test_defaults_are_deepseeks_e4m3_with_fp32_scales():
    """s = max(amax, 1e-4) / 448 by default (E4M3, no power-of-two rounding); the cast is E4M3, saturating."""
    amax = torch.tensor([448.0, 896.0, 0.0])
    assert scales_from_amax(amax).tolist() == [1.0, 2.0, torch.tensor(1e-4 / 448).item()]
    q = cast_to_fp8(torch.tensor([1000.0, -3.0, 0.1]))
    assert q.dtype == torch.float8_e4m3fn and q.float().tolist() == [448.0, -3.0, 0.1015625]
