"""RoPE + YaRN against the DeepSeek-V3 figures of paper.md §1.1 and the YaRN definition."""

import math

import torch

from latentmoe import ModelConfig
from latentmoe.model.rope import apply_rotary, rope_inv_freq


def test_yarn_softmax_scale_matches_paper_mscale_squared():
    config = ModelConfig.from_preset("deepseek-v3")
    # paper.md §1.1: mscale = 0.1 * ln 40 + 1 = 1.36889, mscale^2 = 1.87385, base scale 1/sqrt(192)
    assert math.isclose(config.softmax_scale, 1.87385 / math.sqrt(192), rel_tol=1e-5)
    assert math.isclose(ModelConfig.from_preset("small").softmax_scale, 1 / math.sqrt(48))


def test_yarn_keeps_high_frequencies_and_interpolates_low_ones():
    config = ModelConfig.from_preset("deepseek-v3")
    inv_freq, amplitude = rope_inv_freq(config)
    base = 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    # correction dims by hand: 64*ln(4096/(32*2pi))/(2 ln 1e4) = 10.47 -> 10; beta_slow=1 -> 22.5 -> 23
    torch.testing.assert_close(inv_freq[:10].double(), base[:10], rtol=1e-6, atol=0)
    torch.testing.assert_close(inv_freq[23:].double(), base[23:] / 40, rtol=1e-6, atol=0)
    middle = inv_freq[10:23].double()
    assert torch.all(middle < base[10:23]) and torch.all(middle > base[10:23] / 40)
    assert amplitude == 1.0  # mscale == mscale_all_dim


def test_rotation_preserves_norm_and_relative_positions():
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny")
    inv_freq, _ = rope_inv_freq(config)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def rot(x, pos):
        ang = torch.tensor([float(pos)])[:, None] * inv_freq[None, :].double()
        return apply_rotary(x, ang.cos(), ang.sin())

    assert math.isclose(rot(q, 5).norm().item(), q.norm().item(), rel_tol=1e-12)
    # <R(m) q, R(n) k> depends only on m - n
    a = (rot(q, 7) * rot(k, 3)).sum()
    b = (rot(q, 104) * rot(k, 100)).sum()
    assert math.isclose(a.item(), b.item(), rel_tol=1e-9)
