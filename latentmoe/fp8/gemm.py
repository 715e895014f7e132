"""Blockwise FP8 GEMM with FP32 promotion of partial sums (TR §3.3.2, Fig. 7b; DeepGEMM).

All GEMMs here are "NT", as in DeepGEMM: both operands are stored K-major (the reduced dimension is
contiguous) and the result is ``C_MN = A_MK · B_NKᵀ`` — ``x · Wᵀ`` for a Linear layer. A's scales are
per 1×128 tile (``[M, Kt]``) or per 128×128 block (``[Mb, Kt]``); B's likewise (``[N, Kt]`` or
``[Nb, Kt]``); ``Kt = ceil(K / 128)``. A scale of shape ``[1, 1]`` is a per-tensor scale.

**Promotion.** Because the scales change every 128 elements of K, the tensor core cannot sum the
whole of K by itself: it multiplies raw FP8 values and sums one 128-wide chunk (4 WGMMAs of K = 32),
then the partial sum is copied to FP32 registers on the CUDA cores, multiplied by that chunk's
``s_a[m, k] · s_b[n, k]`` and added to an FP32 accumulator::

    C[m, n] = Σ_k  ( Σ_{i in chunk k} a_q[m, i] · b_q[n, i] )  ·  s_a[m, k] · s_b[n, k]
                   └─── tensor core, one chunk ───┘             └── CUDA cores, FP32 ──┘

:func:`blockwise_matmul_emulated` computes exactly this on any device: the chunk sums are FP32 matmuls
of the decoded FP8 values (each product of two E4M3 numbers has ≤ 8 significant bits, so it is exact in
FP32), the scaling and accumulation are FP32. It therefore equals the float64 product of the dequantised
operands (:func:`blockwise_matmul_reference`) to FP32 rounding. (torch's CPU ``_scaled_mm`` with unit
scales gives the same chunk sums but decodes internally, no faster; here each operand is decoded once.)
That is what DeepSeek's kernels compute on Hopper, up to the tensor core's own limited accumulator
*inside* a chunk.

**Why promotion matters.** H800 tensor cores keep only about 13 fraction bits while accumulating FP8
products (ISCA §3.1.1: an "FP22" register; TR §3.5.2: products aligned to the largest exponent and
truncated). Summed over a long K, the truncation error grows with the accumulator's magnitude — the TR
measures nearly 2 % max relative error at K = 4096. :func:`limited_precision_matmul` simulates that
accumulator; ``blockwise_matmul(..., fraction_bits=13)`` uses it inside each chunk. Promoting every
N_C = 128 elements resets the limited accumulator before it grows (see benchmarks/fp8_parity.py).
Without promotion the scales cannot vary along K at all, which is why fine-grained scaling and
promotion come together: ``promote_every=None`` is only allowed for per-tensor or per-row scales.

**Other paths.** :func:`blockwise_matmul_dequant` dequantises both operands to BF16 and runs one
ordinary matmul (no chunking; faster on CPU, and the CUDA fallback). On CUDA, :func:`blockwise_matmul`
uses ``torch.nn.functional.scaled_mm`` with ``BlockWise1x128`` × ``BlockWise128x128`` scales when this
torch build and GPU provide it (Hopper, CUDA ≥ 12.9), else the dequantising path. torch 2.13's CPU
``scaled_mm`` rejects blockwise scales, so on CPU the emulation is the path, and the tested truth.
:func:`blockwise_matmul_with_path` returns which of the three ran (:class:`GemmPath`), so a caller or a
test can tell the GPU GEMM from its fallback instead of trusting the numbers alone.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latentmoe.device import cuda_available, is_cuda
from latentmoe.fp8.formats import E4M3
from latentmoe.fp8.quant import BLOCK, dequantize

PROMOTION_INTERVAL = 128  # N_C (TR §3.3.2): partial sums promoted to FP32 every 128 elements of K = 4 WGMMAs
H800_FRACTION_BITS = 13  # ISCA §3.1.1: FP22 accumulator, 1 sign + 8 exponent + 13 fraction bits
WGMMA_GROUP = 32  # TR §3.5.2: the tensor core aligns and adds 32 products at a time (FP8 WGMMA K = 32)
SCALED_MM_MIN_CAPABILITY = (9, 0)  # blockwise-scaled cuBLAS GEMMs need Hopper (sm_90) or newer
CUBLAS_SCALE_ALIGN = 4  # cuBLAS blockwise scales: rows of A and K-blocks of B padded to a multiple of 4


class GemmPath(enum.Enum):
    """Which implementation computed a blockwise FP8 GEMM."""

    EMULATED = "emulated"  # chunked FP32 matmuls with promotion (CPU; any device with a simulated accumulator)
    SCALED_MM = "scaled_mm"  # torch's blockwise-scaled GEMM (cuBLAS, Hopper or newer)
    DEQUANT = "dequant"  # dequantise to BF16 + one matmul (the GPU fallback)


@dataclass(frozen=True)
class GemmResult:
    """A GEMM's output ``[M, N]`` and the :class:`GemmPath` that produced it."""

    out: torch.Tensor
    path: GemmPath


# --------------------------------------------------------------------------------------------- scale layouts


def scale_block(shape: torch.Size | tuple[int, int], scales: torch.Tensor, block: int = BLOCK) -> tuple[int, int]:
    """The ``(rows, cols)`` each scale covers, read off the scale grid of a ``[R, C]`` operand.

    Rows: ``R`` scales → 1 (tiles), ``ceil(R/block)`` → ``block`` (weight blocks), 1 → R (per tensor).
    Cols: ``ceil(C/block)`` → ``block``, 1 → C (one scale along the whole row).
    """
    R, C = shape[-2:]
    Sr, Sc = scales.shape[-2:]
    if Sr == R:
        rows = 1
    elif Sr == math.ceil(R / block):
        rows = block
    elif Sr == 1:
        rows = R
    else:
        raise ValueError(f"{Sr} scale rows fit neither 1×{block} tiles nor {block}×{block} blocks of {R} rows")
    if Sc == math.ceil(C / block):
        cols = block
    elif Sc == 1:
        cols = C
    else:
        raise ValueError(f"{Sc} scale columns do not fit {C} columns in groups of {block}")
    return rows, cols


def _scales_per_row(data: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """Scales expanded to one row per data row: ``[R, Kt]``."""
    rows, _ = scale_block(data.shape, scales, block)
    return scales if rows == 1 else scales.repeat_interleave(rows, dim=0)[: data.shape[0]]


def _check_operands(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a_scales.dim() != 2 or b_scales.dim() != 2:
        raise ValueError("blockwise GEMM operands and scales must be matrices: a [M, K], b [N, K]")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"reduced dimensions differ: a {tuple(a.shape)}, b {tuple(b.shape)} (b is [N, K])")
    if a_scales.shape[1] != b_scales.shape[1]:
        raise ValueError(f"scale grids disagree along K: {a_scales.shape[1]} vs {b_scales.shape[1]}")


# --------------------------------------------------------------------------------------------- references


def blockwise_matmul_reference(
    a_fp8: torch.Tensor, a_scales: torch.Tensor, b_fp8: torch.Tensor, b_scales: torch.Tensor, *, block: int = BLOCK
) -> torch.Tensor:
    """float64 ``dequant(a) · dequant(b)ᵀ`` ``[M, N]``: the oracle (dequantisation is exact in float64)."""
    _check_operands(a_fp8, a_scales, b_fp8, b_scales)
    a64 = dequantize(a_fp8, a_scales, scale_block(a_fp8.shape, a_scales, block), dtype=torch.float64)
    b64 = dequantize(b_fp8, b_scales, scale_block(b_fp8.shape, b_scales, block), dtype=torch.float64)
    return a64 @ b64.T


def _truncate(values: torch.Tensor, reference: torch.Tensor, fraction_bits: int) -> torch.Tensor:
    """Cut ``values`` toward zero to multiples of 2^(e − fraction_bits), e = floor(log2 |reference|)."""
    _, exponent = torch.frexp(reference)  # |reference| = m · 2^exponent, m in [0.5, 1)
    quantum = torch.ldexp(torch.ones_like(values), exponent - 1 - fraction_bits)
    return torch.where(reference == 0, torch.zeros_like(values), torch.trunc(values / quantum) * quantum)


def limited_precision_matmul(
    a_MK: torch.Tensor,
    b_NK: torch.Tensor,
    *,
    fraction_bits: int = H800_FRACTION_BITS,
    group: int = WGMMA_GROUP,
) -> torch.Tensor:
    """``a · bᵀ`` summed the way a limited-precision tensor-core accumulator does (a model, float64 ``[M, N]``).

    K is consumed ``group`` products at a time (TR §3.5.2). Each step aligns the running sum and the
    group's products to the largest exponent among them, keeps ``fraction_bits`` bits below it (truncating
    the rest), adds exactly, and stores the sum truncated to ``fraction_bits`` bits of its own exponent —
    an FP22 register for 13 bits. Inputs are the raw (unscaled) FP8 values, as the tensor core sees them.
    Cost is O(M·N·K) float64 work in Python-level groups: meant for experiments, not training.
    """
    a = a_MK.double()
    b = b_NK.double()
    M, K = a.shape
    acc = torch.zeros(M, b.shape[0], dtype=torch.float64, device=a.device)
    for k0 in range(0, K, group):
        products_MNG = a[:, None, k0 : k0 + group] * b[None, :, k0 : k0 + group]  # exact: ≤ 8 + 8 bits
        terms = torch.cat([acc[:, :, None], products_MNG], dim=-1)
        largest = terms.abs().amax(dim=-1, keepdim=True).expand_as(terms)
        total = _truncate(terms, largest, fraction_bits).sum(dim=-1)
        acc = _truncate(total, total, fraction_bits)
    return acc


# --------------------------------------------------------------------------------------------- the GEMMs


def blockwise_matmul_emulated(
    a_fp8: torch.Tensor,
    a_scales: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scales: torch.Tensor,
    *,
    promote_every: int | None = PROMOTION_INTERVAL,
    block: int = BLOCK,
    fraction_bits: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``C_MN = (a·s_a)(b·s_b)ᵀ`` computed chunk by chunk along K with FP32 promotion (module docstring).

    ``promote_every``: chunk length N_C; it must divide the scales' K granularity (``block``).
    ``None`` sums all of K before scaling — only possible when the scales are constant along K.
    ``fraction_bits``: None sums each chunk exactly in FP32 (the ideal tensor core); an integer sums it
    with :func:`limited_precision_matmul` (H800: 13).
    """
    _check_operands(a_fp8, a_scales, b_fp8, b_scales)
    M, K = a_fp8.shape
    sa_MKt = _scales_per_row(a_fp8, a_scales, block).float()
    sb_NKt = _scales_per_row(b_fp8, b_scales, block).float()
    scale_k = scale_block(a_fp8.shape, a_scales, block)[1]  # K elements per scale column
    if promote_every is None:
        if a_scales.shape[1] > 1:
            raise ValueError(
                "scales vary along K every 128 elements, so partial sums must be promoted (and scaled) at least "
                "that often: promote_every=None needs per-tensor or per-row scales"
            )
        promote_every = K
    elif promote_every < 1 or (a_scales.shape[1] > 1 and scale_k % promote_every):
        raise ValueError(f"promote_every={promote_every} must divide the scale granularity along K ({scale_k})")
    N = b_fp8.shape[0]
    if K == 0:
        return torch.zeros(M, N, dtype=out_dtype, device=a_fp8.device)
    a = a_fp8.float()  # exact: every FP8 value is an FP32 value
    b = b_fp8.float()
    acc_MN = torch.empty(M, N, dtype=torch.float32, device=a.device)
    partial_MN = torch.empty_like(acc_MN)  # reused across chunks: fresh allocations are slow on CPU
    for k0 in range(0, K, promote_every):
        k1 = min(k0 + promote_every, K)
        if fraction_bits is None:
            torch.mm(a[:, k0:k1], b[:, k0:k1].T, out=partial_MN)  # the tensor core's chunk, exact products
        else:
            partial_MN.copy_(limited_precision_matmul(a[:, k0:k1], b[:, k0:k1], fraction_bits=fraction_bits))
        kb = k0 // scale_k
        # (partial · s_a) · s_b in FP32; DeepGEMM forms s_a · s_b first — the same two roundings, a different order.
        partial_MN.mul_(sa_MKt[:, kb, None])
        if k0 == 0:
            torch.mul(partial_MN, sb_NKt[None, :, kb], out=acc_MN)
        else:
            acc_MN.addcmul_(partial_MN, sb_NKt[None, :, kb])
    return acc_MN.to(out_dtype)


def blockwise_matmul_dequant(
    a_fp8: torch.Tensor,
    a_scales: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scales: torch.Tensor,
    *,
    block: int = BLOCK,
    compute_dtype: torch.dtype = torch.bfloat16,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantise both operands to ``compute_dtype`` and run one matmul: the fast approximation.

    Same quantised inputs; the dequantised values are rounded to BF16 once (exact with ``ue8m0`` scales)
    and the matmul accumulates as the backend does (FP32 inside oneDNN / cuBLAS).
    """
    _check_operands(a_fp8, a_scales, b_fp8, b_scales)
    a = dequantize(a_fp8, a_scales, scale_block(a_fp8.shape, a_scales, block), dtype=compute_dtype)
    b = dequantize(b_fp8, b_scales, scale_block(b_fp8.shape, b_scales, block), dtype=compute_dtype)
    return (a @ b.T).to(out_dtype)


def scaled_mm_blockwise_available(device: torch.device | str) -> bool:
    """Whether this torch and GPU may run ``F.scaled_mm`` with 1×128 × 128×128 scales (capability check)."""
    device = torch.device(device)
    if not is_cuda(device) or not cuda_available():
        return False
    if not (hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")):
        return False
    return torch.cuda.get_device_capability(device) >= SCALED_MM_MIN_CAPABILITY


def _fits_scaled_mm(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor) -> bool:
    M, K = a.shape
    N = b.shape[0]
    return (
        a.dtype == b.dtype == E4M3.dtype
        and K % BLOCK == 0
        and N % BLOCK == 0
        and scale_block(a.shape, a_scales, BLOCK) == (1, BLOCK)
        and scale_block(b.shape, b_scales, BLOCK) == (BLOCK, BLOCK)
    )


def _scaled_mm_blockwise(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor):
    """cuBLAS blockwise FP8 GEMM (BF16 out). A's scales must be M-major; B is passed K×N column-major."""
    M = a.shape[0]
    pad_m = -M % CUBLAS_SCALE_ALIGN
    if pad_m:
        a = torch.cat([a, torch.zeros(pad_m, a.shape[1], dtype=a.dtype, device=a.device)])
        a_scales = torch.cat([a_scales, a_scales.new_ones(pad_m, a_scales.shape[1])])
    b_scales = F.pad(b_scales, (0, -b_scales.shape[1] % CUBLAS_SCALE_ALIGN), value=1.0)
    y = F.scaled_mm(
        a,
        b.t(),
        a_scales.t().contiguous().t(),
        F.ScalingType.BlockWise1x128,
        b_scales.t(),
        F.ScalingType.BlockWise128x128,
        output_dtype=torch.bfloat16,
    )
    return y[:M]


def cuda_blockwise_matmul(
    a_fp8: torch.Tensor,
    a_scales: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scales: torch.Tensor,
    *,
    block: int = BLOCK,
    out_dtype: torch.dtype = torch.float32,
) -> GemmResult:
    """GPU path: torch's blockwise scaled matmul where supported, else dequantise + BF16 matmul."""
    if (
        block == BLOCK
        and scaled_mm_blockwise_available(a_fp8.device)
        and _fits_scaled_mm(a_fp8, a_scales, b_fp8, b_scales)
    ):
        try:
            out = _scaled_mm_blockwise(a_fp8, a_scales.float(), b_fp8, b_scales.float()).to(out_dtype)
            return GemmResult(out, GemmPath.SCALED_MM)
        except (RuntimeError, ValueError, NotImplementedError):
            pass  # this torch/cuBLAS build lacks the blockwise layout: fall through (the result says so)
    out = blockwise_matmul_dequant(a_fp8, a_scales, b_fp8, b_scales, block=block, out_dtype=out_dtype)
    return GemmResult(out, GemmPath.DEQUANT)


def blockwise_matmul_with_path(
    a_fp8: torch.Tensor,
    a_scales: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scales: torch.Tensor,
    *,
    promote_every: int | None = PROMOTION_INTERVAL,
    block: int = BLOCK,
    fraction_bits: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> GemmResult:
    """:func:`blockwise_matmul` and the :class:`GemmPath` it took."""
    if a_fp8.is_cuda and fraction_bits is None and promote_every == PROMOTION_INTERVAL:
        return cuda_blockwise_matmul(a_fp8, a_scales, b_fp8, b_scales, block=block, out_dtype=out_dtype)
    out = blockwise_matmul_emulated(
        a_fp8,
        a_scales,
        b_fp8,
        b_scales,
        promote_every=promote_every,
        block=block,
        fraction_bits=fraction_bits,
        out_dtype=out_dtype,
    )
    return GemmResult(out, GemmPath.EMULATED)


def blockwise_matmul(
    a_fp8: torch.Tensor,
    a_scales: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scales: torch.Tensor,
    *,
    promote_every: int | None = PROMOTION_INTERVAL,
    block: int = BLOCK,
    fraction_bits: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``C_MN = (a·s_a)(b·s_b)ᵀ`` for FP8 ``a [M, K]``, ``b [N, K]`` and their FP32 scales.

    On CUDA (and without a simulated accumulator) the GPU path; everywhere else the exact emulation
    with FP32 promotion every ``promote_every`` elements of K (:func:`blockwise_matmul_emulated`).
    """
    return blockwise_matmul_with_path(
        a_fp8,
        a_scales,
        b_fp8,
        b_scales,
        promote_every=promote_every,
        block=block,
        fraction_bits=fraction_bits,
        out_dtype=out_dtype,
    ).out
