"""RMSNorm, computed in fp32 whatever the input dtype (TR §3.3.1: normalisations stay in high precision)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for references
        xc = x.to(compute_dtype)
        normed = xc * torch.rsqrt(xc.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(compute_dtype)).to(x.dtype)
