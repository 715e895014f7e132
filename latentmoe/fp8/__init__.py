"""FP8 mixed-precision training as in DeepSeek-V3 (TR §3.3), emulated exactly on CPU; docs/fp8.md has the layouts.

How FP8 training works here
---------------------------
``latentmoe train --precision fp8`` calls :func:`convert_to_fp8` on the model and then trains under
BF16 autocast. After conversion every Linear layer of attention, dense FFNs and shared experts, and
every routed-expert matmul, runs its three GEMMs (Fprop ``x·Wᵀ``, Dgrad ``dy·W``, Wgrad ``dyᵀ·x``) as:

1. quantise both operands to E4M3 along the reduced dimension, with one FP32 scale per 1×128 tile
   (activations, gradients) or per 128×128 block (weights), computed online from the group's max-abs
   (:func:`quantize_tiles`, :func:`quantize_blocks`; formats and the scale rule in ``formats.py``);
2. multiply the raw FP8 values 128 elements of K at a time, scale each chunk's partial sum by its two
   scales and add it to an FP32 accumulator (:func:`blockwise_matmul`) — DeepSeek's "promotion";
3. keep for backward only the FP8 activation tiles and their scales (:class:`FP8Linear`).

Everything else stays high precision: embedding, output head, router, norms, attention softmax, MTP
projection (by default), FP32 master weights and gradients, and AdamW moments in FP32 or BF16
(``--adam-moments bf16``, TR §3.3.3). Parameters never change dtype, so checkpoints are ordinary
high-precision state dicts.

On CPU the FP8 GEMM is emulated exactly (decode FP8 → FP32, chunked FP32 matmuls), slower than BF16
— benchmarks/fp8_parity.py measures by how much. On a CUDA GPU the same call uses torch's blockwise
scaled matmul where this torch provides it, else dequantise + BF16 matmul.

:func:`limited_precision_matmul` simulates the H800 tensor core's ~13-fraction-bit accumulator, to
show why promotion is needed, and :func:`logfmt_encode` / :func:`logfmt_decode` implement the
LogFMT-nBit communication format of the ISCA paper (§3.2).
"""

from latentmoe.fp8.convert import HIGH_PRECISION_MODULES, FP8Conversion, convert_to_fp8, fp8_modules
from latentmoe.fp8.errors import calc_diff, relative_error, relative_mse
from latentmoe.fp8.formats import AMAX_FLOOR, E4M3, E4M3_MAX, E5M2, E5M2_MAX, FP8Format, fp8_format
from latentmoe.fp8.gemm import (
    H800_FRACTION_BITS,
    PROMOTION_INTERVAL,
    GemmPath,
    GemmResult,
    blockwise_matmul,
    blockwise_matmul_dequant,
    blockwise_matmul_emulated,
    blockwise_matmul_reference,
    blockwise_matmul_with_path,
    limited_precision_matmul,
    scaled_mm_blockwise_available,
)
from latentmoe.fp8.linear import FP8Linear, FP8Matmul, FP8Recipe, fp8_linear
from latentmoe.fp8.logfmt import LogFMT, logfmt_decode, logfmt_encode
from latentmoe.fp8.quant import (
    BLOCK,
    TILE,
    Quantized,
    dequantize,
    quantize_blocks,
    quantize_blockwise,
    quantize_tensorwise,
    quantize_tiles,
)

__all__ = [
    "AMAX_FLOOR",
    "BLOCK",
    "E4M3",
    "E4M3_MAX",
    "E5M2",
    "E5M2_MAX",
    "FP8Conversion",
    "FP8Format",
    "FP8Linear",
    "FP8Matmul",
    "FP8Recipe",
    "GemmPath",
    "GemmResult",
    "H800_FRACTION_BITS",
    "HIGH_PRECISION_MODULES",
    "LogFMT",
    "PROMOTION_INTERVAL",
    "Quantized",
    "TILE",
    "blockwise_matmul",
    "blockwise_matmul_dequant",
    "blockwise_matmul_emulated",
    "blockwise_matmul_reference",
    "blockwise_matmul_with_path",
    "calc_diff",
    "convert_to_fp8",
    "dequantize",
    "fp8_format",
    "fp8_linear",
    "fp8_modules",
    "limited_precision_matmul",
    "logfmt_decode",
    "logfmt_encode",
    "quantize_blocks",
    "quantize_blockwise",
    "quantize_tensorwise",
    "quantize_tiles",
    "relative_error",
    "relative_mse",
    "scaled_mm_blockwise_available",
]
