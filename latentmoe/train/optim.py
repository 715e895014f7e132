"""AdamW with the usual weight-decay split, and the warmup + cosine learning-rate schedule.

DeepSeek-V3 trains with AdamW (β1 = 0.9, β2 = 0.95, weight decay 0.1) and a learning rate that
warms up linearly and then decays. Two details matter in practice:

* **What gets weight decay.** Decay pulls weights towards zero; it is meant for the matrices that
  mix features (projections, embeddings, expert weights — the grouped experts are 3-D tensors
  ``[n_experts, out, in]`` and count as matrices too). Norm scales and other 1-D vectors are not
  decayed: pulling an RMSNorm gain towards zero only fights the normalisation. The rule here is
  simply ``param.ndim >= 2`` → decay, otherwise → no decay. The router bias is a *buffer*, not a
  parameter, so the optimizer never sees it (the trainer updates it by the aux-loss-free rule).

* **The schedule is a pure function of the step.** :func:`lr_at` maps a 0-based step index to a
  learning rate, with no hidden state, so resuming from a checkpoint needs nothing but the step
  number, and the schedule can be tested against hand-computed values::

      step < warmup:          lr = max_lr * (step + 1) / warmup          (linear, starts near 0)
      warmup <= step < total: p = (step - warmup) / (total - warmup)      (0 → 1)
                              lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * p)) / 2
      step >= total:          lr = min_lr
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamSplit:
    """Parameter names split by whether AdamW applies weight decay to them."""

    decay: list[str]
    no_decay: list[str]


def split_decay_params(model: nn.Module) -> ParamSplit:
    """Names of trainable parameters with weight decay (``ndim >= 2``) and without (norms, 1-D).

    Tied parameters appear once (``named_parameters`` de-duplicates shared tensors).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(name)
    return ParamSplit(decay=decay, no_decay=no_decay)


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW with two parameter groups: group 0 decays (matrices), group 1 does not (norms, 1-D).

    ``lr`` is the initial value; the trainer overwrites every group's ``lr`` each step from
    :func:`lr_at`. The group order is fixed, so an optimizer state saved by one process loads
    into an optimizer built the same way in another.
    """
    split = split_decay_params(model)
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in split.decay], "weight_decay": weight_decay},
        {"params": [params[n] for n in split.no_decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_at(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for the 0-based ``step``: linear warmup, then cosine decay to ``min_lr``.

    Warmup reaches ``max_lr`` at step ``warmup_steps - 1``; the cosine starts at ``max_lr`` at step
    ``warmup_steps`` and would reach ``min_lr`` at ``total_steps``; later steps stay at ``min_lr``.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if min_lr > max_lr:
        raise ValueError(f"min_lr ({min_lr}) must not exceed max_lr ({max_lr})")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
