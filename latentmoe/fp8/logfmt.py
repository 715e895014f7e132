"""LogFMT-nBit: a logarithmic n-bit code per 1×128 tile, for compressing MoE communication (ISCA §3.2).

DeepSeek tried this format for the expert-parallel combine (and found it more accurate than E4M3 or
E5M2 at 8 bits, and ≈ BF16 at 10 bits) but did not adopt it: log/exp cost too much GPU bandwidth when
fused with the all-to-all. Encoding one tile ``x_1 … x_128`` with n bits per value (paper.md §5):

* ``min = log|x_i|`` and ``max = log|x_j|`` are the natural logs of the tile's smallest and largest
  nonzero magnitudes; ``min`` is clamped to ``>= max − 32·ln 2`` (a 2^32 dynamic range, about E5's);
* the sign takes the top bit, the magnitude an (n−1)-bit code K:
  K = 0 ↔ 0, K = 1 ↔ exp(min), K = 2^(n−1) − 1 ↔ exp(max), evenly spaced in log space in between::

      Step = (max − min) / (2^(n−1) − 2),     decode(S, K) = (−1)^S · exp(min + Step · (K − 1))  (K ≥ 1)

* each value takes the code whose *decoded value* is nearest in linear space (not the nearest log),
  which the paper asks for "for the unbiased activation quantization". Values below exp(min) (possible
  after the clamp) round in linear space between 0 and exp(min). Ties go to the smaller magnitude.

The tile metadata (``log_min`` and ``step``, FP32) travels with the codes: 8 bytes per 128 values.
All functions are vectorised over tiles; :func:`logfmt_encode` / :func:`logfmt_decode` are pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latentmoe.fp8.quant import TILE

LOG_RANGE = 32 * math.log(2)  # ISCA §3.2: min is constrained to be > max − log(2^32)
MIN_BITS, MAX_BITS = 3, 16  # n = 3 is the smallest with a Step (2^(n-1) − 2 ≥ 1); codes are stored in int32


@dataclass(frozen=True)
class LogFMT:
    """A LogFMT-n encoded tensor ``[..., K]``: ``codes [..., K]`` (sign bit << (n−1) | K) and per-tile
    ``log_min``, ``step`` ``[..., ceil(K/tile)]`` FP32."""

    codes: torch.Tensor
    log_min: torch.Tensor
    step: torch.Tensor
    bits: int
    tile: int = TILE

    @property
    def nbytes(self) -> int:
        """Wire size: n bits per value plus 8 bytes of metadata per tile."""
        meta = self.log_min.numel() * self.log_min.element_size() + self.step.numel() * self.step.element_size()
        return math.ceil(self.codes.numel() * self.bits / 8) + meta


def top_code(bits: int) -> int:
    """Largest magnitude code K = 2^(n−1) − 1 (127 for LogFMT-8)."""
    return 2 ** (bits - 1) - 1


def _check_bits(bits: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"LogFMT needs {MIN_BITS} <= bits <= {MAX_BITS}, got {bits}")


def logfmt_encode(x: torch.Tensor, bits: int = 8, tile: int = TILE) -> LogFMT:
    """Encode ``x [..., K]`` with one (min, Step) per 1 × ``tile`` slice of the last dimension."""
    _check_bits(bits)
    K = x.shape[-1]
    pad = -K % tile
    xf = x.float()
    if pad:
        xf = F.pad(xf, (0, pad))  # zeros never set min or max
    x_tiles = xf.reshape(*xf.shape[:-1], -1, tile)
    mag = x_tiles.abs()
    nonzero = mag > 0
    log_mag = torch.log(torch.where(nonzero, mag, torch.ones_like(mag)))
    log_max = torch.where(nonzero, log_mag, torch.full_like(log_mag, -math.inf)).amax(dim=-1)
    log_min = torch.where(nonzero, log_mag, torch.full_like(log_mag, math.inf)).amin(dim=-1)
    empty = ~nonzero.any(dim=-1)
    log_max = torch.where(empty, torch.zeros_like(log_max), log_max)  # an all-zero tile: finite metadata
    log_min = torch.where(empty, torch.zeros_like(log_min), torch.maximum(log_min, log_max - LOG_RANGE))
    top = top_code(bits)
    step = (log_max - log_min) / (top - 1)

    lo_min, st = log_min[..., None], step[..., None]
    safe_step = torch.where(st > 0, st, torch.ones_like(st))
    position = torch.where(st > 0, (log_mag - lo_min) / safe_step, torch.zeros_like(log_mag))
    # Candidate codes around the value; the nearer decoded value (linear space) wins.
    k_lo = (position.floor() + 1).clamp(0, top)
    value_lo = torch.where(k_lo >= 1, torch.exp(lo_min + st * (k_lo - 1)), torch.zeros_like(mag))
    k_hi = torch.where(st > 0, (k_lo + 1).clamp(max=top), k_lo)  # Step 0: one magnitude, one code
    value_hi = torch.exp(lo_min + st * (k_hi - 1))
    k = torch.where(mag - value_lo > value_hi - mag, k_hi, k_lo)
    k = torch.where(nonzero, k, torch.zeros_like(k)).to(torch.int32)
    sign = (x_tiles < 0).to(torch.int32)
    codes = (sign << (bits - 1)) | k
    codes = codes.reshape(*xf.shape)[..., :K]
    return LogFMT(codes.contiguous(), log_min, step, bits, tile)


def logfmt_decode(encoded: LogFMT, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(−1)^S · exp(min + Step · (K − 1))`` per value, 0 for K = 0; the shape of the encoded tensor."""
    bits, tile = encoded.bits, encoded.tile
    _check_bits(bits)
    codes = encoded.codes
    K = codes.shape[-1]
    pad = -K % tile
    if pad:
        codes = F.pad(codes, (0, pad))
    codes = codes.reshape(*codes.shape[:-1], -1, tile)
    k = (codes & top_code(bits)).float()
    negative = ((codes >> (bits - 1)) & 1).bool()
    mag = torch.exp(encoded.log_min[..., None] + encoded.step[..., None] * (k - 1))
    mag = torch.where(k > 0, mag, torch.zeros_like(mag))
    x = torch.where(negative, -mag, mag)
    return x.reshape(*x.shape[:-2], -1)[..., :K].to(dtype)
