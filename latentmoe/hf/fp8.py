"""FP8 block dequantisation on load, as DeepSeek's ``fp8_cast_bf16.py`` does it.

An FP8 checkpoint stores a weight ``W [M, N]`` as ``q`` (float8_e4m3fn, same shape) plus
``weight_scale_inv [ceil(M/bm), ceil(N/bn)]`` (fp32): one multiplier per (bm × bn) tile, tiles counted
from the top-left corner, the last row/column of tiles cut short when M or N is not a multiple of the block:

    W[i, j] ≈ q[i, j] · weight_scale_inv[i // bm, j // bn]

(transformers instead infers the tile from ``M / scale_rows``, which agrees only when the block divides the
dimension; we follow DeepSeek's ceil-div tiles.) The product is formed in fp32, one row of tiles at a time and
in place, so dequantising costs one fp32 copy of the weight and no expanded scale grid.
"""

from __future__ import annotations

import torch

from latentmoe.fp8.formats import E4M3

FP8_DTYPE = E4M3.dtype


def scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of ``weight_scale_inv`` for a weight of ``shape`` [M, N] and tile ``block`` (bm, bn): ceil-div."""
    M, N = shape
    bm, bn = block
    return (M + bm - 1) // bm, (N + bn - 1) // bn


def dequantize_blocks(
    q_MN: torch.Tensor, scale_inv_mn: torch.Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``q_MN`` (float8_e4m3fn [M, N]) times its per-tile ``scale_inv_mn`` ([ceil(M/bm), ceil(N/bn)]) → ``dtype``."""
    if q_MN.dim() != 2:
        raise ValueError(f"an FP8 block-quantised weight must be 2-D, got shape {list(q_MN.shape)}")
    M, N = q_MN.shape
    bm, bn = block
    if tuple(scale_inv_mn.shape) != scale_grid((M, N), block):
        raise ValueError(
            f"scale grid {list(scale_inv_mn.shape)} does not fit a [{M}, {N}] weight in {bm}x{bn} blocks "
            f"(expected {list(scale_grid((M, N), block))})"
        )
    w_MN = q_MN.to(torch.float32)
    scale = scale_inv_mn.to(torch.float32)
    for r, row0 in enumerate(range(0, M, bm)):
        w_MN[row0 : row0 + bm].mul_(scale[r].repeat_interleave(bn)[:N])  # one row of tiles, broadcast over rows
    return w_MN if dtype == torch.float32 else w_MN.to(dtype)
