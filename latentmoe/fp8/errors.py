"""How far a low-precision result is from its reference: the comparisons every FP8 test and benchmark uses."""

from __future__ import annotations

import torch


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """‖x − ref‖₂ / ‖ref‖₂ in float64 (0 when both are zero)."""
    x64, r64 = x.detach().double(), reference.detach().double()
    denom = r64.norm()
    diff = (x64 - r64).norm()
    return float(diff / denom) if denom > 0 else float(diff)


def relative_mse(x: torch.Tensor, reference: torch.Tensor) -> float:
    """mean((x − ref)²) / mean(ref²): the squared :func:`relative_error` (ISCA §3.2's comparison)."""
    return relative_error(x, reference) ** 2


def calc_diff(x: torch.Tensor, reference: torch.Tensor) -> float:
    """DeepGEMM's ``calc_diff``: 1 − 2·Σxy / Σ(x² + y²), a scale-aware 1 − cosine similarity."""
    x64, r64 = x.detach().double(), reference.detach().double()
    denom = (x64 * x64 + r64 * r64).sum()
    return float(1 - 2 * (x64 * r64).sum() / denom) if denom > 0 else 0.0
