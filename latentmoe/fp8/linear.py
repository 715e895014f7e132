"""FP8Linear: a Linear layer whose three GEMMs run in FP8 with fine-grained scales (TR §3.3, Fig. 6).

A Linear layer ``y = x · Wᵀ`` costs three GEMMs per training step; each quantises its two operands along
the dimension it reduces over, so that the GEMM can apply one scale per 128-element chunk of that
dimension (gemm.py)::

    Fprop   y_MN  = x_MK  · W_NKᵀ     reduce K:  x in 1×128 tiles along K,  W in 128×128 blocks
    Dgrad   dx_MK = dy_MN · W_NK      reduce N:  dy in 1×128 tiles along N, Wᵀ = the same blocks, transposed
    Wgrad   dW_NK = dy_MNᵀ · x_MK     reduce M:  dyᵀ and xᵀ in 1×128 tiles along M (128 tokens × 1 channel)

* **Activations are saved for backward in FP8.** Wgrad needs x tiled along the token dimension, so the
  forward quantises ``xᵀ`` in 1×128 tiles along M straight from the high-precision x and saves that
  (1 byte + 4/128 bytes per element instead of BF16's 2); the Fprop tiles are dropped after the GEMM.
  ``FP8Recipe(retile_for_wgrad=True)`` instead saves the Fprop tiles and re-tiles them in backward
  (dequantise, transpose, quantise again): the TR's "1×128 → 128×1" path for activations that other
  backward ops share, at the cost of a second rounding.
* **The weight is quantised once per forward** to 128×128 blocks; because the blocks are square, Dgrad
  reads the same FP8 weight transposed with transposed scales — no second quantisation.
* **Gradients stay fine-grained.** dy is quantised in 1×128 tiles for Dgrad. The TR reports that 128×128
  block-wise quantisation of activation gradients diverged on a 16B MoE (App. B.2), which is why dy
  gets tiles, not blocks.
* **Precision around the GEMMs.** Master weights and their gradients are FP32: the FP8 weight is a copy
  made each forward, and dW comes out of an FP32 accumulator into the FP32 ``.grad``. The bias (if any) is
  added in FP32. The output dtype follows autocast (BF16 under ``precision="fp8"``), else the input's.
* **All GEMM inputs are E4M3** (TR §3.3.2, "mantissa over exponents"); ``grad_fmt="e5m2"`` gives the
  hybrid recipe other frameworks use, for comparison.

``fp8_linear(x, weight, bias, recipe)`` is the functional form; :class:`FP8Linear` is a drop-in
``nn.Linear`` subclass (same parameters and state-dict keys), and :class:`FP8Matmul` the callable the
routed experts use (``Experts.expert_linear``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from latentmoe.fp8.formats import SCALE_FORMATS, fp8_format
from latentmoe.fp8.gemm import PROMOTION_INTERVAL, blockwise_matmul, blockwise_matmul_dequant
from latentmoe.fp8.quant import BLOCK, TILE, dequantize, quantize_blocks, quantize_tiles

GEMM_PATHS = ("exact", "dequant")


@dataclass(frozen=True)
class FP8Recipe:
    """How an FP8 Linear quantises and multiplies (defaults: DeepSeek-V3's recipe).

    fmt: format of x and W (forward); grad_fmt: format of dy (backward) — both "e4m3" in the TR.
    scale_fmt: None for FP32 scales, "ue8m0" to round every scale up to a power of two.
    tile / block: activation tile width and weight block size (128 / 128).
    gemm: "exact" = chunked GEMM with FP32 promotion (blockwise_matmul; on CUDA the GPU path),
        "dequant" = dequantise to BF16 + one matmul (faster on CPU; the same quantised inputs).
    retile_for_wgrad: False = save xᵀ quantised along tokens in the forward (one rounding of x per GEMM);
        True = save the Fprop tiles and re-tile them in backward (x rounded twice for Wgrad).
    """

    fmt: str = "e4m3"
    grad_fmt: str = "e4m3"
    scale_fmt: str | None = None
    tile: int = TILE
    block: int = BLOCK
    gemm: str = "exact"
    retile_for_wgrad: bool = False

    def __post_init__(self) -> None:
        fp8_format(self.fmt)
        fp8_format(self.grad_fmt)
        if self.scale_fmt not in SCALE_FORMATS:
            raise ValueError(f"scale_fmt must be None or 'ue8m0', got {self.scale_fmt!r}")
        if self.gemm not in GEMM_PATHS:
            raise ValueError(f"gemm must be one of {GEMM_PATHS}, got {self.gemm!r}")
        if self.tile != self.block or self.tile % PROMOTION_INTERVAL:
            raise ValueError(
                f"tile ({self.tile}) and block ({self.block}) must be equal multiples of the promotion interval "
                f"{PROMOTION_INTERVAL}: the GEMM applies one tile scale and one block scale per K chunk"
            )


def _gemm(recipe: FP8Recipe, a_MK, a_scales, b_NK, b_scales) -> torch.Tensor:
    """``a · bᵀ`` in FP32 by the recipe's GEMM path."""
    if recipe.gemm == "dequant":
        return blockwise_matmul_dequant(a_MK, a_scales, b_NK, b_scales, block=recipe.block)
    return blockwise_matmul(a_MK, a_scales, b_NK, b_scales, block=recipe.block)


class _FP8LinearFunction(torch.autograd.Function):
    """Fprop / Dgrad / Wgrad in FP8; saves only FP8 tensors and their scales (see module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, recipe: FP8Recipe, out_dtype: torch.dtype):
        K = x.shape[-1]
        N = weight.shape[0]
        r = recipe
        with torch.autocast(device_type=x.device.type, enabled=False):
            x_MK = x.reshape(-1, K)
            xq = quantize_tiles(x_MK, r.tile, fmt=r.fmt, scale_fmt=r.scale_fmt)
            wq = quantize_blocks(weight, r.block, fmt=r.fmt, scale_fmt=r.scale_fmt)
            y_MN = _gemm(r, xq.data, xq.scales, wq.data, wq.scales)
            if bias is not None:
                y_MN = y_MN + bias.float()
            if not ctx.needs_input_grad[1]:
                saved_x = ()  # a frozen weight needs no Wgrad, so no activation is kept
            elif r.retile_for_wgrad:
                saved_x = (xq.data, xq.scales)  # Fprop tiles along K, re-tiled in backward
            else:
                xq_KM = quantize_tiles(x_MK.t(), r.tile, fmt=r.fmt, scale_fmt=r.scale_fmt)
                saved_x = (xq_KM.data, xq_KM.scales)  # Wgrad's operand: xᵀ in 1×128 tiles along tokens
        ctx.save_for_backward(wq.data, wq.scales, *saved_x)
        ctx.recipe = recipe
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.has_bias = bias is not None
        return y_MN.to(out_dtype).view(*x.shape[:-1], N)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        w_data_NK, w_scales_NbKb, *saved_x = ctx.saved_tensors
        r: FP8Recipe = ctx.recipe
        N = w_data_NK.shape[0]
        grad_x = grad_w = grad_b = None
        with torch.autocast(device_type=grad_y.device.type, enabled=False):
            dy_MN = grad_y.reshape(-1, N)
            if ctx.needs_input_grad[0]:
                # Dgrad reduces over N: dy in 1×128 tiles along N; Wᵀ [K, N] is the forward's blocks transposed.
                dyq = quantize_tiles(dy_MN, r.tile, fmt=r.grad_fmt, scale_fmt=r.scale_fmt)
                w_data_KN = w_data_NK.t().contiguous()
                w_scales_KbNb = w_scales_NbKb.t().contiguous()
                grad_x = _gemm(r, dyq.data, dyq.scales, w_data_KN, w_scales_KbNb).to(ctx.x_dtype).view(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                # Wgrad reduces over M (tokens): dyᵀ and xᵀ in 1×128 tiles along M.
                dyq_NM = quantize_tiles(dy_MN.t(), r.tile, fmt=r.grad_fmt, scale_fmt=r.scale_fmt)
                if r.retile_for_wgrad:  # x's Fprop tiles: dequantise, transpose, quantise along M again
                    x_MK = dequantize(*saved_x, (1, r.tile))
                    xq_KM = quantize_tiles(x_MK.t(), r.tile, fmt=r.fmt, scale_fmt=r.scale_fmt)
                    x_data_KM, x_scales_KMt = xq_KM.data, xq_KM.scales
                else:
                    x_data_KM, x_scales_KMt = saved_x
                grad_w = _gemm(r, dyq_NM.data, dyq_NM.scales, x_data_KM, x_scales_KMt).to(ctx.w_dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = dy_MN.float().sum(dim=0)
        return grad_x, grad_w, grad_b, None, None


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, recipe: FP8Recipe | None = None
) -> torch.Tensor:
    """``x · weightᵀ + bias`` with FP8 Fprop, Dgrad and Wgrad. x ``[..., K]``, weight ``[N, K]`` → ``[..., N]``.

    The result is BF16 under autocast (the autocast dtype), else ``x.dtype``.
    """
    recipe = recipe or FP8Recipe()
    device_type = x.device.type
    out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    return _FP8LinearFunction.apply(x, weight, bias, recipe, out_dtype)


@dataclass(frozen=True)
class FP8Matmul:
    """``fp8_linear`` bound to a recipe: the ``linear(x, weight)`` callable the routed experts call."""

    recipe: FP8Recipe = FP8Recipe()

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return fp8_linear(x, weight, bias, self.recipe)


class FP8Linear(nn.Linear):
    """``nn.Linear`` with FP8 GEMMs. Parameters stay high-precision master weights, so the state dict
    (names, dtypes) is the plain Linear's: checkpoints load into an unconverted model unchanged."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        recipe: FP8Recipe | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe or FP8Recipe()

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: FP8Recipe | None = None) -> FP8Linear:
        """An FP8Linear sharing ``linear``'s Parameter objects (no copy: optimizers keep working)."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, recipe=recipe)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.recipe)

    def extra_repr(self) -> str:
        r = self.recipe
        return f"{super().extra_repr()}, fp8={r.fmt}/{r.grad_fmt}, scales={r.scale_fmt or 'fp32'}, gemm={r.gemm}"
