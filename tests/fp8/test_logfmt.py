"""LogFMT-nBit (ISCA §3.2, paper.md §16 check 18): golden codes, the min clamp, linear-space rounding, errors."""

import math

import pytest
import torch

from latentmoe.fp8 import LogFMT, logfmt_decode, logfmt_encode, quantize_tiles, relative_mse
from latentmoe.fp8.logfmt import LOG_RANGE, top_code


def golden_tile():
    """min |x| = 1 (log 0), max |x| = e^1.26, so LogFMT-8's Step = 1.26 / 126 = 0.01."""
    x = torch.zeros(128)
    x[0] = 1.0  # the minimum -> code 1
    x[1] = -math.exp(1.26)  # the maximum, negative -> sign bit + code 127
    x[2] = math.exp(0.5)  # exactly on a level: K − 1 = 50 -> code 51
    x[3] = 0.0  # zero -> code 0
    return x


def test_golden_codes_for_logfmt8():
    enc = logfmt_encode(golden_tile(), bits=8)
    assert top_code(8) == 127 and enc.codes.dtype == torch.int32
    assert enc.codes[:4].tolist() == [1, 128 | 127, 51, 0]
    torch.testing.assert_close(enc.log_min, torch.tensor([0.0]))
    torch.testing.assert_close(enc.step, torch.tensor([0.01]))  # Step = (max − min) / (2^(n−1) − 2)
    dec = logfmt_decode(enc)
    assert dec[3] == 0.0  # code 0 <-> 0
    assert dec[0] == 1.0  # code 1 <-> exp(min)
    torch.testing.assert_close(dec[1], torch.tensor(-math.exp(1.26)))  # top code <-> exp(max), with its sign
    torch.testing.assert_close(dec[2], torch.tensor(math.exp(0.5)))


def test_decode_formula_for_every_code():
    enc = LogFMT(
        codes=torch.arange(256, dtype=torch.int32)[None, :128],
        log_min=torch.tensor([[-2.0]]),
        step=torch.tensor([[0.05]]),
        bits=8,
    )
    dec = logfmt_decode(enc)[0]
    k = torch.arange(128)
    expected = torch.where(k == 0, 0.0, torch.exp(-2.0 + 0.05 * (k - 1)))
    torch.testing.assert_close(dec, expected)
    neg = logfmt_decode(LogFMT(enc.codes | 128, enc.log_min, enc.step, 8))[0]
    torch.testing.assert_close(neg, -expected)


def test_min_is_clamped_to_max_minus_32_ln2_and_tiny_values_round_linearly():
    x = torch.zeros(128)
    x[0] = 1.0  # max: log 0
    x[1] = 1e-12  # log = −27.6 < −32 ln 2 = −22.18: clamped away
    x[2] = 1.5 * math.exp(-LOG_RANGE)  # above the clamped exp(min): an ordinary code
    x[3] = 0.6 * math.exp(-LOG_RANGE)  # below exp(min), nearer to it than to 0 -> code 1
    x[4] = 0.4 * math.exp(-LOG_RANGE)  # below exp(min), nearer to 0 -> code 0
    enc = logfmt_encode(x, bits=8)
    torch.testing.assert_close(enc.log_min, torch.tensor([-LOG_RANGE]))  # min >= max − 32 ln 2
    assert enc.codes[1] == 0 and enc.codes[3] == 1 and enc.codes[4] == 0 and enc.codes[2] >= 1


def test_rounding_is_to_the_nearest_value_in_linear_space_not_log_space():
    # Levels 1 and e^Step: the log-space midpoint is e^(Step/2), the linear one (1 + e^Step)/2, which is larger.
    step = 0.5
    x = torch.zeros(128)
    x[0] = 1.0
    x[1] = math.exp(step * (top_code(4) - 1))  # LogFMT-4: codes 1..7, Step = max / 6
    between = 0.5 * (math.exp(step / 2) + (1 + math.exp(step)) / 2)  # above the log midpoint, below the linear one
    x[2] = between
    enc = logfmt_encode(x, bits=4)
    torch.testing.assert_close(enc.step, torch.tensor([step]))
    assert enc.codes[2] == 1  # nearest in linear space is the lower level; log-space rounding would say code 2


def test_all_zero_and_single_magnitude_tiles():
    x = torch.zeros(2, 256)
    x[1, 128:] = -3.0
    dec = logfmt_decode(logfmt_encode(x, bits=8))
    assert torch.isfinite(dec).all()
    torch.testing.assert_close(dec, x)


@pytest.mark.parametrize("bits", [8, 10])
def test_round_trip_error_is_within_half_a_level(bits):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 300, generator=gen) * torch.logspace(-3, 3, 300)
    enc = logfmt_encode(x, bits=bits)
    assert enc.codes.shape == x.shape and enc.step.shape == (16, 3)
    dec = logfmt_decode(enc)
    # Inside [exp(min), exp(max)] neighbouring levels differ by a factor e^Step: error <= (e^Step − 1)/2 · |x|.
    step = enc.step.repeat_interleave(128, dim=1)[:, :300]
    log_min = enc.log_min.repeat_interleave(128, dim=1)[:, :300]
    inside = x.abs().log() >= log_min
    bound = (torch.exp(step) - 1) / 2 * x.abs()
    assert ((dec - x).abs()[inside] <= bound[inside] * (1 + 1e-4) + 1e-30).all()
    assert (torch.sign(dec) == torch.sign(x))[dec != 0].all()


def test_logfmt8_beats_e4m3_and_e5m2_on_gaussian_tiles():
    # paper.md §16 check 18: relative MSE on 1x128 Gaussian tiles, LogFMT-8 < E4M3 < E5M2 (per-tile scales).
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    log8 = relative_mse(logfmt_decode(logfmt_encode(x, bits=8)), x)
    log10 = relative_mse(logfmt_decode(logfmt_encode(x, bits=10)), x)
    e4m3 = relative_mse(quantize_tiles(x, fmt="e4m3").dequantize(), x)
    e5m2 = relative_mse(quantize_tiles(x, fmt="e5m2").dequantize(), x)
    assert log10 < log8 < e4m3 < e5m2


def test_wire_size_and_bad_bits():
    enc = logfmt_encode(torch.randn(4, 256), bits=10)
    assert enc.nbytes == 4 * 256 * 10 // 8 + 4 * 2 * 2 * 4  # 10 bits per value + (min, Step) fp32 per tile
    with pytest.raises(ValueError, match="bits"):
        logfmt_encode(torch.randn(4), bits=2)
