"""Rotary position embedding with YaRN context extension (DeepSeek-V3 TR §4.3; V2 §2.1.3).

MLA applies RoPE only to the decoupled parts: the per-head query slice ``q_pe`` and the one key
``k_pe`` shared by all heads. Rotation pairs are *interleaved* — channels (2i, 2i+1) form one
complex number, exactly as DeepSeek's reference (``view_as_complex``) and the official weights
expect (transformers calls this ``rope_interleave``).

YaRN ("NTK-by-parts") keeps high-frequency dimensions as they are, divides low-frequency ones by the
scaling factor s, and ramps linearly between the two using the correction range derived from
beta_fast / beta_slow (numbers of rotations over the original context). Attention logits are then
multiplied by mscale^2 with mscale = 0.1 ln s + 1 (see ``ModelConfig.softmax_scale``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from latentmoe.config import ModelConfig, yarn_mscale


def yarn_correction_dim(num_rotations: float, dim: int, base: float, original_max_pos: int) -> float:
    """The rotary dimension index whose wavelength fits ``num_rotations`` times in the original context."""
    return dim * math.log(original_max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(
    beta_fast: float, beta_slow: float, dim: int, base: float, original_max_pos: int
) -> tuple[int, int]:
    """[low, high] dimension indices of the linear ramp between extrapolation and interpolation."""
    low = math.floor(yarn_correction_dim(beta_fast, dim, base, original_max_pos))
    high = math.ceil(yarn_correction_dim(beta_slow, dim, base, original_max_pos))
    return max(low, 0), min(high, dim - 1)


def rope_inv_freq(config: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[qk_rope_head_dim // 2]`` (fp32) and the cos/sin amplitude factor.

    The amplitude ("attention_factor" in transformers) is mscale(s, mscale) / mscale(s, mscale_all_dim),
    which is 1 for DeepSeek-V3 (mscale = mscale_all_dim = 1); the softmax-scale correction is separate.
    """
    dim = config.qk_rope_head_dim
    base = float(config.rope_theta)
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
    inv_freq = 1.0 / (base**exponents)
    amplitude = 1.0
    yarn = config.yarn
    if yarn is not None:
        factor = float(yarn["factor"])
        original = int(yarn["original_max_position_embeddings"])
        low, high = yarn_correction_range(
            float(yarn.get("beta_fast", 32)), float(yarn.get("beta_slow", 1)), dim, base, original
        )
        if low == high:
            high += 1e-3  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float64, device=device) - low) / (high - low)).clamp(0, 1)
        extrapolation_weight = 1.0 - ramp  # 1 for high-frequency dims (kept), 0 for low-frequency ones
        inv_freq = inv_freq / factor * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
        mscale, mscale_all_dim = yarn.get("mscale"), yarn.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            amplitude = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all_dim))
        else:
            amplitude = yarn_mscale(factor)
    return inv_freq.float(), amplitude


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. ``forward(positions_S) -> (cos_SR, sin_SR)``, R = rope_dim/2."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.amplitude = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions_S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles_SR = positions_S.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return angles_SR.cos() * self.amplitude, angles_SR.sin() * self.amplitude


def apply_rotary(x_BSHD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the position angle; returns x's dtype and shape.

    ``x_BSHD``: [batch, seq, heads, rope_dim]; ``cos_SR``/``sin_SR``: [seq, rope_dim/2].
    """
    x = x_BSHD.to(torch.promote_types(x_BSHD.dtype, torch.float32)).unflatten(-1, (-1, 2))
    real, imag = x[..., 0], x[..., 1]
    cos, sin = cos_SR[None, :, None, :], sin_SR[None, :, None, :]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).to(x_BSHD.dtype)
