"""Fine-grained FP8 quantisation: 1×128 tiles for activations, 128×128 blocks for weights (TR §3.3.2).

Why fine-grained. One outlier in a tensor sets a per-tensor scale so large that every ordinary value
falls into FP8's coarse subnormal range or to zero. DeepSeek-V3 instead gives every small group its
own scale, so an outlier only costs precision inside its own group:

* **activations, 1×128 tiles**: one scale per token per 128 channels. ``x_MK`` → ``scales_MKt`` with
  ``Kt = ceil(K / 128)``; the tile runs along the GEMM's reduced dimension K, which is what lets the
  GEMM apply the scales per 128-wide slice of K (see gemm.py);
* **weights, 128×128 blocks**: one scale per 128 output × 128 input channels. ``w_NK`` →
  ``scales_NbKt``. A square block is the same block after a transpose, so the backward pass reuses
  the forward's quantised weight for ``dy · W`` without quantising again.

Layout (K = 300, three tiles per row; the last one is partial)::

    x_MK:      | tile 0: cols 0-127 | tile 1: cols 128-255 | tile 2: cols 256-299 (+84 zero pad) |
    scales_MKt: [s_m0, s_m1, s_m2] per row m

Dimensions that are not multiples of the tile/block are zero-padded for the max-abs and trimmed
afterwards: ``data`` always has the shape of the input, ``scales`` the ceil-divided grid (DeepSeek's
and safetensors' ``weight_scale_inv`` convention). A scale *multiplies* to dequantise:
``x ≈ data · scale`` — it is what Hugging Face calls ``weight_scale_inv``.

Every function here is pure: tensors in, new tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latentmoe.fp8.formats import FP8Format, cast_to_fp8, scales_from_amax

TILE = 128  # TR §3.3.2: activations scaled per 1 × N_c tile, N_c = 128
BLOCK = 128  # TR §3.3.2: weights scaled per 128 × 128 block


@dataclass(frozen=True)
class Quantized:
    """An FP8 tensor and its FP32 scales, one per ``block = (rows, cols)`` of its last two dimensions.

    data: FP8 ``[..., R, C]`` (the input's shape); scales: FP32 ``[..., ceil(R/rows), ceil(C/cols)]``.
    1×128 tiles have ``block == (1, 128)``, 128×128 weight blocks ``(128, 128)``, a per-tensor scale
    ``(R, C)``. A 1-D input ``[C]`` has ``scales [ceil(C/cols)]``.
    """

    data: torch.Tensor
    scales: torch.Tensor
    block: tuple[int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.scales, self.block, dtype=dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of data + scales: what storing (or sending) this tensor costs."""
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()


def _as_matrix(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (x[None, :], True) if x.dim() == 1 else (x, False)


def quantize_blockwise(
    x: torch.Tensor,
    block: tuple[int, int],
    *,
    fmt: str | FP8Format = "e4m3",
    scale_fmt: str | None = None,
) -> Quantized:
    """Quantise the last two dimensions of ``x`` in ``block = (rows, cols)`` groups (the general form).

    Per group: ``s = max(amax, 1e-4) / FMT_MAX`` (optionally a power of two), ``data = fp8(x / s)``.
    """
    rows, cols = block
    if rows < 1 or cols < 1:
        raise ValueError(f"block must be positive, got {block}")
    x2, squeeze = _as_matrix(x)
    R, C = x2.shape[-2:]
    pad_r, pad_c = -R % rows, -C % cols
    xf = x2.float()
    if pad_r or pad_c:
        xf = F.pad(xf, (0, pad_c, 0, pad_r))
    lead = xf.shape[:-2]
    Rb, Cb = (R + pad_r) // rows, (C + pad_c) // cols
    x_blocks = xf.reshape(*lead, Rb, rows, Cb, cols)  # copies only for a transposed view (Wgrad's xᵀ, dyᵀ)
    amax = x_blocks.abs().amax(dim=(-3, -1))
    scales = scales_from_amax(amax, fmt, scale_fmt)
    data = cast_to_fp8(x_blocks / scales[..., :, None, :, None], fmt).view(*lead, R + pad_r, C + pad_c)
    if pad_r or pad_c:
        data = data[..., :R, :C].contiguous()
    if squeeze:
        data, scales = data[0], scales[0]
    return Quantized(data, scales, (rows, cols))


def quantize_tiles(
    x: torch.Tensor,
    tile: int = TILE,
    *,
    fmt: str | FP8Format = "e4m3",
    scale_fmt: str | None = None,
) -> Quantized:
    """Activations: one scale per 1 × ``tile`` slice of the last dimension. ``x [..., K]`` →
    ``data [..., K]`` FP8, ``scales [..., ceil(K/tile)]`` FP32."""
    return quantize_blockwise(x, (1, tile), fmt=fmt, scale_fmt=scale_fmt)


def quantize_blocks(
    w: torch.Tensor,
    block: int = BLOCK,
    *,
    fmt: str | FP8Format = "e4m3",
    scale_fmt: str | None = None,
) -> Quantized:
    """Weights: one scale per ``block × block`` square of the last two dimensions. ``w [..., N, K]`` →
    ``data [..., N, K]`` FP8, ``scales [..., ceil(N/block), ceil(K/block)]`` FP32 (stacked experts
    ``[E, N, K]`` are quantised per expert)."""
    if w.dim() < 2:
        raise ValueError(f"quantize_blocks needs a matrix, got shape {tuple(w.shape)}")
    return quantize_blockwise(w, (block, block), fmt=fmt, scale_fmt=scale_fmt)


def quantize_tensorwise(x: torch.Tensor, *, fmt: str | FP8Format = "e4m3", scale_fmt: str | None = None) -> Quantized:
    """One scale for each matrix (the last two dimensions): the coarse baseline fine-grained scaling beats."""
    x2, _ = _as_matrix(x)
    return quantize_blockwise(x, tuple(x2.shape[-2:]), fmt=fmt, scale_fmt=scale_fmt)


def dequantize(
    data: torch.Tensor,
    scales: torch.Tensor,
    block: tuple[int, int],
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``data · scale`` per block, computed in at least FP32 and returned as ``dtype``.

    Every FP8 value is exact in BF16, FP32 and FP64; the product with an FP32 scale is exact in FP64,
    and in any format when the scale is a power of two (``ue8m0``); otherwise it is rounded once.
    """
    rows, cols = block
    d2, squeeze = _as_matrix(data)
    s2 = scales[None, :] if squeeze else scales
    R, C = d2.shape[-2:]
    pad_r, pad_c = -R % rows, -C % cols
    compute = torch.promote_types(dtype, torch.float32)
    x = d2.to(compute)
    if pad_r or pad_c:
        x = F.pad(x, (0, pad_c, 0, pad_r))
    lead = x.shape[:-2]
    Rb, Cb = (R + pad_r) // rows, (C + pad_c) // cols
    if tuple(s2.shape[-2:]) != (Rb, Cb):
        raise ValueError(f"scales of shape {tuple(scales.shape)} do not fit data {tuple(data.shape)} in blocks {block}")
    x = x.reshape(*lead, Rb, rows, Cb, cols) * s2.to(compute)[..., :, None, :, None]
    x = x.view(*lead, R + pad_r, C + pad_c)
    if pad_r or pad_c:
        x = x[..., :R, :C]
    if squeeze:
        x = x[0]
    return x.to(dtype)
