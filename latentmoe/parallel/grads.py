"""Gradient reductions shared by the distributed strategies: dense vs routed-expert parameters, flat all-reduces,
squared norms. Every rank calls them in the same order (they are collective where a group is given)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from latentmoe.model.moe import is_expert_parameter

NamedParams = list[tuple[str, nn.Parameter]]


def split_named_params(model: nn.Module) -> tuple[NamedParams, NamedParams]:
    """``(dense, routed experts)`` trainable parameters with their names, shared tensors once."""
    dense, expert, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (expert if is_expert_parameter(name) else dense).append((name, p))
    return dense, expert


def sum_sq(grads: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Σ g² over the gradients, as one fp32 scalar on ``device`` (the communication device)."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        total = total + g.detach().float().pow(2).sum().to(device)
    return total


def all_reduce_grads(params: list[nn.Parameter], group, divide_by: int) -> None:
    """One flat all-reduce(SUM) of the gradients over ``group`` (None: this rank alone), then ÷ ``divide_by``."""
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    if group is not None:
        dist.all_reduce(flat, group=group)
    flat /= divide_by
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n
