"""The 8-bit float formats and the scale rule of DeepSeek-V3's FP8 recipe (TR §3.3.2; REPO kernel.py).

An FP8 number cannot hold an arbitrary tensor: E4M3 covers ±448 with 4 significant bits, E5M2 covers
±57344 with 3. So every group of values (a 1×128 tile of an activation, a 128×128 block of a weight)
gets one FP32 *scale* ``s``; the group is stored as ``q = x / s`` in FP8 and read back as ``q · s``.
DeepSeek picks ``s`` so that the group's largest magnitude lands on the format's largest value::

    s = max(amax, AMAX_FLOOR) / FMT_MAX          (amax = max |x| over the group, computed online)

The floor keeps an all-zero group finite: its scale is tiny but positive, ``0 / s = 0``, no NaN.
With ``scale_fmt="ue8m0"`` the scale is rounded *up* to a power of two (an unsigned 8-bit exponent,
the format Blackwell's microscaling hardware and DeepSeek's later checkpoints use); rounding up keeps
``|x / s| <= FMT_MAX``, and a power-of-two scale makes dequantisation exact in any float format.

torch 2.13's CPU cast to ``float8_e4m3fn`` saturates and the cast to ``float8_e5m2`` does not
(1e6 becomes inf); neither is promised elsewhere, so :func:`cast_to_fp8` clamps explicitly first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3_MAX = 448.0  # OCP 8-bit floating point spec, E4M3FN: S.1111.110 = 1.75 · 2^8 (torch.finfo(float8_e4m3fn).max)
E5M2_MAX = 57344.0  # OCP spec, E5M2: S.11110.11 = 1.75 · 2^15 (torch.finfo(float8_e5m2).max)
AMAX_FLOOR = 1e-4  # REPO inference/kernel.py act_quant_kernel: s = max(amax, 1e-4) / 448
SCALE_FORMATS = (None, "ue8m0")


@dataclass(frozen=True)
class FP8Format:
    """One 8-bit float format: torch dtype, largest finite value, explicit mantissa bits, smallest normal exponent."""

    name: str
    dtype: torch.dtype
    max: float
    mantissa_bits: int
    min_normal_exponent: int

    @property
    def relative_step(self) -> float:
        """Spacing of neighbouring normal values relative to the bottom of their binade, 2^-m.

        Round-to-nearest error is at most half of it for normal numbers: 1/16 for E4M3, 1/8 for E5M2.
        """
        return 2.0**-self.mantissa_bits

    @property
    def subnormal_step(self) -> float:
        """Spacing below the smallest normal, 2^(e_min − m): 2^-9 for E4M3, 2^-16 for E5M2."""
        return 2.0 ** (self.min_normal_exponent - self.mantissa_bits)


E4M3 = FP8Format("e4m3", torch.float8_e4m3fn, E4M3_MAX, 3, -6)  # OCP spec: bias 7, smallest normal 2^-6
E5M2 = FP8Format("e5m2", torch.float8_e5m2, E5M2_MAX, 2, -14)  # OCP spec: bias 15, smallest normal 2^-14


def fp8_format(name: str | FP8Format) -> FP8Format:
    """``"e4m3"`` (DeepSeek-V3: every GEMM input, forward and backward) or ``"e5m2"`` (the hybrid recipes'
    gradient format, kept for comparison)."""
    if isinstance(name, FP8Format):
        return name
    if name == "e4m3":
        return E4M3
    if name == "e5m2":
        return E5M2
    raise ValueError(f"unknown FP8 format {name!r}; expected 'e4m3' or 'e5m2'")


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= x for positive x, exactly (frexp, no log2 rounding): 3 → 4, 4 → 4, 0.3 → 0.5."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa · 2^exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(x), exponent)


def scales_from_amax(amax: torch.Tensor, fmt: str | FP8Format = "e4m3", scale_fmt: str | None = None) -> torch.Tensor:
    """FP32 scales ``max(amax, AMAX_FLOOR) / FMT_MAX``, rounded up to powers of two for ``"ue8m0"``."""
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    scales = amax.float().clamp_min(AMAX_FLOOR) / fp8_format(fmt).max
    return pow2_ceil(scales) if scale_fmt == "ue8m0" else scales


def cast_to_fp8(x: torch.Tensor, fmt: str | FP8Format = "e4m3") -> torch.Tensor:
    """Round ``x`` (already divided by its scale) to the FP8 format, saturating at ±max explicitly."""
    f = fp8_format(fmt)
    return x.clamp(-f.max, f.max).to(f.dtype)
