"""References for FP8 training (TR §3.3): fake quantisation by explicit loops, and the limited accumulator.

Written from the TR and the OCP 8-bit float spec, sharing no code with ``latentmoe.fp8``: per group of
values ``s = max(amax, 1e-4) / FMT_MAX`` (an FP32 division, as DeepSeek's kernel computes it), optionally
rounded up to a power of two ("ue8m0"); ``q = fp8(clamp(x / s))`` with torch's own cast; read back as
``q · s`` in float64 (exact). The GEMMs are then float64 products of the read-back operands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FORMATS = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}  # OCP spec maxima
AMAX_FLOOR = 1e-4  # DeepSeek-V3 inference/kernel.py: s = max(amax, 1e-4) / 448


@dataclass
class FakeQuant:
    """``q`` FP8 values ``[R, C]``, FP32 ``scales`` one per block, ``values`` = q · s in float64."""

    q: torch.Tensor
    scales: torch.Tensor
    values: torch.Tensor


def _pow2_ceil(s: float) -> float:
    m, e = math.frexp(s)  # s = m · 2^e, m in [0.5, 1)
    return math.ldexp(1.0, e - 1) if m == 0.5 else math.ldexp(1.0, e)


def fake_quantize(x_RC: torch.Tensor, rows: int, cols: int, *, fmt: str = "e4m3", ue8m0: bool = False) -> FakeQuant:
    """Quantise ``x`` in ``rows × cols`` blocks (the last blocks may be partial), one loop iteration per block."""
    dtype, fmax = FORMATS[fmt]
    x = x_RC.detach().float()
    R, C = x.shape
    q = torch.empty(R, C, dtype=dtype)
    scales = torch.empty(math.ceil(R / rows), math.ceil(C / cols), dtype=torch.float32)
    values = torch.empty(R, C, dtype=torch.float64)
    for i, r0 in enumerate(range(0, R, rows)):
        for j, c0 in enumerate(range(0, C, cols)):
            block = x[r0 : r0 + rows, c0 : c0 + cols]
            amax = torch.tensor(max(float(block.abs().max()), AMAX_FLOOR), dtype=torch.float32)
            s = amax / torch.tensor(fmax, dtype=torch.float32)  # FP32 division
            if ue8m0:
                s = torch.tensor(_pow2_ceil(float(s)), dtype=torch.float32)
            qb = (block / s).clamp(-fmax, fmax).to(dtype)
            q[r0 : r0 + rows, c0 : c0 + cols] = qb
            scales[i, j] = s
            values[r0 : r0 + rows, c0 : c0 + cols] = qb.double() * float(s)
    return FakeQuant(q, scales, values)


def tiles(x_RC: torch.Tensor, tile: int = 128, **kw) -> torch.Tensor:
    """float64 read-back of ``x`` quantised in 1 × tile groups along its last dimension."""
    return fake_quantize(x_RC, 1, tile, **kw).values


def blocks(w_RC: torch.Tensor, block: int = 128, **kw) -> torch.Tensor:
    """float64 read-back of ``w`` quantised in block × block squares."""
    return fake_quantize(w_RC, block, block, **kw).values


@dataclass
class LinearGrads:
    """float64 y = x·Wᵀ, dx = dy·W, dW = dyᵀ·x of an FP8 Linear layer, each from its quantised operands."""

    y: torch.Tensor
    dx: torch.Tensor
    dw: torch.Tensor


def fp8_linear_reference(
    x_MK: torch.Tensor,
    w_NK: torch.Tensor,
    dy_MN: torch.Tensor,
    *,
    fmt: str = "e4m3",
    grad_fmt: str = "e4m3",
    ue8m0: bool = False,
    tile: int = 128,
    retile_for_wgrad: bool = False,
) -> LinearGrads:
    """The three GEMMs of DeepSeek-V3's recipe (TR Fig. 6): each operand quantised along the reduced dimension.

    Fprop: x in 1×tile groups along K, W in tile×tile blocks. Dgrad: dy in 1×tile groups along N (``grad_fmt``),
    the same W blocks. Wgrad: dyᵀ and xᵀ in 1×tile groups along the tokens M; with ``retile_for_wgrad`` x is
    first rounded in its Fprop tiles and that read-back re-quantised along M.
    """
    w_q = blocks(w_NK, tile, fmt=fmt, ue8m0=ue8m0)
    y = tiles(x_MK, tile, fmt=fmt, ue8m0=ue8m0) @ w_q.T
    dx = tiles(dy_MN, tile, fmt=grad_fmt, ue8m0=ue8m0) @ w_q
    x_for_wgrad = tiles(x_MK, tile, fmt=fmt, ue8m0=ue8m0).float() if retile_for_wgrad else x_MK
    dw = tiles(dy_MN.T, tile, fmt=grad_fmt, ue8m0=ue8m0) @ tiles(x_for_wgrad.T, tile, fmt=fmt, ue8m0=ue8m0).T
    return LinearGrads(y, dx, dw)


def _cut(value: float, exponent_of: float, fraction_bits: int) -> float:
    """``value`` truncated toward zero to a multiple of 2^(floor(log2 |exponent_of|) − fraction_bits)."""
    if exponent_of == 0.0:
        return 0.0
    quantum = math.ldexp(1.0, math.frexp(exponent_of)[1] - 1 - fraction_bits)
    return math.trunc(value / quantum) * quantum


def limited_dot(a_K: list[float], b_K: list[float], *, fraction_bits: int, group: int = 32) -> float:
    """One output of a tensor core that keeps ``fraction_bits`` bits (TR §3.5.2, ISCA §3.1.1), scalar Python.

    Products enter ``group`` at a time; the running sum and the group's products are aligned to the largest
    exponent among them and cut to ``fraction_bits`` bits below it, added exactly, and the sum is stored
    cut to ``fraction_bits`` bits of its own exponent.
    """
    acc = 0.0
    for k0 in range(0, len(a_K), group):
        terms = [acc] + [a * b for a, b in zip(a_K[k0 : k0 + group], b_K[k0 : k0 + group], strict=True)]
        largest = max(abs(t) for t in terms)
        total = math.fsum(_cut(t, largest, fraction_bits) for t in terms)
        acc = _cut(total, total, fraction_bits)
    return acc
