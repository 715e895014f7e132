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

* **Optimizer state in BF16 (option).** DeepSeek-V3 stores AdamW's first and second moments in BF16
  (TR §3.3.3) while master weights and gradients stay FP32. ``build_optimizer(..., moments="bf16")``
  returns :class:`AdamWLowPrecisionMoments`, which does exactly torch's AdamW arithmetic in FP32 but
  keeps the moments rounded to BF16 between steps (half the optimizer memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
    moments: str = "fp32",
) -> torch.optim.Optimizer:
    """AdamW with two parameter groups: group 0 decays (matrices), group 1 does not (norms, 1-D).

    ``lr`` is the initial value; the trainer overwrites every group's ``lr`` each step from
    :func:`lr_at`. The group order is fixed, so an optimizer state saved by one process loads
    into an optimizer built the same way in another. ``moments="bf16"`` stores the AdamW moments
    in BF16 (:class:`AdamWLowPrecisionMoments`); "fp32" is ``torch.optim.AdamW``.
    """
    if moments not in MOMENT_DTYPES:
        raise ValueError(f"moments must be one of {', '.join(MOMENT_DTYPES)}, got {moments!r}")
    split = split_decay_params(model)
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in split.decay], "weight_decay": weight_decay},
        {"params": [params[n] for n in split.no_decay], "weight_decay": 0.0},
    ]
    if moments == "fp32":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    return AdamWLowPrecisionMoments(groups, lr=lr, betas=betas, eps=eps, moments_dtype=MOMENT_DTYPES[moments])


class AdamWLowPrecisionMoments(torch.optim.Optimizer):
    """AdamW whose moments ``exp_avg``/``exp_avg_sq`` are *stored* in ``moments_dtype`` (BF16 in TR §3.3.3).

    Each step widens the stored moments to FP32, updates them with the FP32 gradient, stores them back
    rounded, and applies the update from the un-rounded FP32 values — torch.optim.AdamW's single-tensor
    arithmetic (decoupled weight decay, bias correction) in the same order, so with
    ``moments_dtype=torch.float32`` it matches torch's AdamW bit for bit (tested). Parameters keep their dtype.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        moments_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.moments_dtype = moments_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype)
                state["step"] += 1
                step = state["step"].item()
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(exp_avg)  # rounded to moments_dtype for storage
                state["exp_avg_sq"].copy_(exp_avg_sq)
                p.mul_(1 - lr * weight_decay)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
        return loss

    def load_state_dict(self, state_dict) -> None:
        """torch casts loaded state to the parameter dtype; cast the moments back (BF16→FP32→BF16 is exact)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moments_dtype)


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
