"""Validation: the main head's mean next-token loss over batches, in eval mode, under the run's precision."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from latentmoe.model.mtp import next_token_loss


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16" and "fp8" (the converted GEMMs run in FP8, everything else under bf16 autocast)."""
    if precision in ("bf16", "fp8"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    max_batches: int | None = None,
    precision: str = "fp32",
) -> float:
    """Mean main-head next-token loss (nats/token) over ``batches`` of ``[B, S]`` ids, in eval mode.

    The MTP heads are not run: validation measures the model that generates. The model's previous
    train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for i, ids in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            ids = ids.to(device)
            with autocast(device, precision):
                logits = model(ids, compute_mtp=False).logits
            total += float(next_token_loss(logits, ids))
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate() got no validation batches")
    return total / count
