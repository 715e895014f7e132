"""What one row (one token's hidden state) looks like on the wire: the dispatch and combine payload codecs.

DeepSeek-V3 dispatches in FP8 and combines in BF16 (TR §3.3, ISCA §2.3.2); ISCA §3.2 tried LogFMT-8
for the combine. Each codec turns rows ``x_ND`` into a wire tensor ``[N, W]`` and back:

=========  ====================================================  ==================================
codec      wire row for hidden size D (Dt = ceil(D / 128))       bytes per row
=========  ====================================================  ==================================
fp32       D fp32                                                4·D
bf16       D bf16                                                2·D
fp8        D E4M3 bytes, then Dt fp32 scales (1×128 tiles)       D + 4·Dt     (DeepEP: + 16 B of index)
logfmt     D codes (LogFMT-8, one byte), Dt log_min, Dt step     D + 8·Dt
=========  ====================================================  ==================================

FP8 travels as ``uint8`` because gloo has no FP8 type. The quantisers are ``latentmoe.fp8``'s
(:func:`~latentmoe.fp8.quantize_tiles`, :func:`~latentmoe.fp8.logfmt_encode`); nothing is re-implemented here.

Gradients: a lossy codec is straight-through — the backward exchange carries the gradient in BF16
(``grad_dtype``), as DeepSeek's backward combine does; ``fp32`` and ``bf16`` send gradients in their own
dtype. Every codec is exact about its size: :meth:`Codec.row_bytes` is what the traffic counters charge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TILE = 128  # 1×128 scaling tiles (TR §3.3.2), the unit of FP8 scales and LogFMT metadata
FP32_BYTES, BF16_BYTES, FP8_BYTES = 4, 2, 1
LOGFMT_BITS = 8  # ISCA §3.2: LogFMT-8 beat E4M3/E5M2 in their combine experiment
LOGFMT_META_BYTES = 2 * FP32_BYTES  # log_min and step per tile
DISPATCH_CODECS = ("fp32", "bf16", "fp8")
COMBINE_CODECS = ("fp32", "bf16", "logfmt")


@dataclass(frozen=True)
class Codec:
    """A payload format (``fp32``, ``bf16``, ``fp8`` or ``logfmt``); see the module table."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in ("fp32", "bf16", "fp8", "logfmt"):
            raise ValueError(f"unknown payload codec {self.name!r}; expected fp32, bf16, fp8 or logfmt")

    def row_bytes(self, hidden: int) -> int:
        """Exact wire bytes of one row of ``hidden`` values."""
        tiles = math.ceil(hidden / TILE)
        return {
            "fp32": FP32_BYTES * hidden,
            "bf16": BF16_BYTES * hidden,
            "fp8": FP8_BYTES * hidden + FP32_BYTES * tiles,
            "logfmt": hidden * LOGFMT_BITS // 8 + LOGFMT_META_BYTES * tiles,
        }[self.name]

    def grad_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the backward exchange sends gradients in."""
        return {"fp32": torch.float32, "bf16": torch.bfloat16}.get(self.name, torch.bfloat16)

    # ------------------------------------------------------------------ rows <-> wire
    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Rows to the wire tensor ``[N, W]`` (no autograd)."""
        if self.name == "fp32":
            return x_ND.float().contiguous()
        if self.name == "bf16":
            return x_ND.to(torch.bfloat16).contiguous()
        n = x_ND.shape[0]
        if self.name == "fp8":
            from latentmoe.fp8 import quantize_tiles

            q = quantize_tiles(x_ND, TILE)
            return torch.cat([q.data.view(torch.uint8), q.scales.float().contiguous().view(torch.uint8)], dim=1)
        from latentmoe.fp8 import logfmt_encode

        enc = logfmt_encode(x_ND, bits=LOGFMT_BITS, tile=TILE)
        meta = torch.cat([enc.log_min.float(), enc.step.float()], dim=1).contiguous().view(torch.uint8)
        return torch.cat([enc.codes.to(torch.uint8).reshape(n, -1), meta], dim=1)

    def decode(self, wire_NW: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
        """Wire tensor back to rows ``[N, hidden]`` of ``dtype``."""
        if self.name in ("fp32", "bf16"):
            return wire_NW.to(dtype)
        tiles = math.ceil(hidden / TILE)
        values, meta = wire_NW[:, :hidden], wire_NW[:, hidden:].contiguous()
        if self.name == "fp8":
            from latentmoe.fp8 import dequantize

            scales = meta.view(torch.float32).reshape(-1, tiles)
            return dequantize(values.contiguous().view(torch.float8_e4m3fn), scales, (1, TILE), dtype=dtype)
        from latentmoe.fp8 import LogFMT, logfmt_decode

        meta_f = meta.view(torch.float32).reshape(-1, 2 * tiles)
        enc = LogFMT(values.to(torch.int32), meta_f[:, :tiles], meta_f[:, tiles:], LOGFMT_BITS, TILE)
        return logfmt_decode(enc, dtype=dtype)


def codec(name: str | Codec, *, allowed: tuple[str, ...] | None = None, role: str = "payload") -> Codec:
    """A :class:`Codec` by name; ``allowed`` restricts it (the dispatch cannot be LogFMT, the combine not FP8)."""
    c = name if isinstance(name, Codec) else Codec(name)
    if allowed is not None and c.name not in allowed:
        raise ValueError(f"{role} codec {c.name!r} is not one of {', '.join(allowed)}")
    return c
