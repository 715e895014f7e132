"""ZeRO-1: each parameter's AdamW state on one rank of the ranks holding that parameter (TR §3.2: ZeRO-1 DP).

A parameter of a pipeline stage is replicated over two different sets of ranks:

    dense (attention, dense FFN, router, shared expert, norms, embedding / head)   the stage group (D·P ranks)
    routed-expert slice                                                           its expert-DP group (D ranks)

so the optimizer is two ``torch.distributed.optim.ZeroRedundancyOptimizer`` — one per family, each over its
replica group — around the same AdamW (``torch.optim.AdamW``, or ``AdamWLowPrecisionMoments`` for BF16 moments)
with the trainer's two weight-decay groups. ZeRO gives every parameter to one rank of its group (greedy by size):
that rank keeps the moments and steps it; the updated weights are then broadcast to the others. Gradients are
already reduced (the strategy's all-reduce), so the arithmetic is the single process's AdamW, parameter by
parameter — the state is only *stored* in one place. A family whose group is one rank gets the plain optimizer.

:class:`ShardedAdamW` is what the trainer holds: ``param_groups`` (the trainer sets ``lr`` on them), ``step``,
``zero_grad``. Checkpoints go through :meth:`ShardedAdamW.named_state` (collective: ZeRO consolidates each group's
shards on its first rank) and :meth:`ShardedAdamW.load_named_state`, keyed by parameter name, so the on-disk
format does not depend on the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from latentmoe.model.moe import is_expert_parameter
from latentmoe.parallel.topology import ProcessGroups
from latentmoe.train.optim import MOMENT_DTYPES, AdamWLowPrecisionMoments

ADAM_EPS = 1e-8  # build_optimizer's default


@dataclass
class _Family:
    """One replica family: its optimizer (ZeRO or plain), the names of its parameters in the optimizer's order,
    and its group (None: one rank)."""

    optimizer: torch.optim.Optimizer
    names: list[str]
    group: dist.ProcessGroup | None

    @property
    def sharded(self) -> bool:
        return isinstance(self.optimizer, ZeroRedundancyOptimizer)


class ShardedAdamW:
    """AdamW over this rank's parameters with ZeRO-1 state sharding (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        groups: ProcessGroups,
        *,
        lr: float,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = ADAM_EPS,
        moments: str = "fp32",
    ) -> None:
        if moments not in MOMENT_DTYPES:
            raise ValueError(f"moments must be one of {', '.join(MOMENT_DTYPES)}, got {moments!r}")
        cls, extra = (torch.optim.AdamW, {}) if moments == "fp32" else (
            AdamWLowPrecisionMoments, {"moments_dtype": MOMENT_DTYPES[moments]})
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.families: list[_Family] = []
        for is_expert, group in ((False, groups.stage), (True, groups.expert_dp)):
            mine = [(n, p) for n, p in named if is_expert_parameter(n) == is_expert]
            if not mine:
                continue
            decay = [(n, p) for n, p in mine if p.ndim >= 2]
            no_decay = [(n, p) for n, p in mine if p.ndim < 2]
            param_groups = [{"params": [p for _, p in part], "weight_decay": wd}
                            for part, wd in ((decay, weight_decay), (no_decay, 0.0)) if part]
            names = [n for part in (decay, no_decay) for n, _ in part]
            if group is None:
                opt = cls(param_groups, lr=lr, betas=betas, eps=eps, **extra)
            else:
                opt = ZeroRedundancyOptimizer(param_groups, optimizer_class=cls, process_group=group, lr=lr,
                                              betas=betas, eps=eps, **extra)
            self.families.append(_Family(opt, names, group))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for f in self.families for g in f.optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for f in self.families:
            f.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for f in self.families:
            f.optimizer.step()

    # ------------------------------------------------------------------ checkpoints
    def named_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-parameter AdamW state by name. Collective over each ZeRO group: the full state of a family is on its
        group's first rank afterwards (the others return that family's part as {})."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for f in self.families:
            if f.sharded:
                f.optimizer.consolidate_state_dict(to=0)
                if dist.get_rank(f.group) != 0:
                    continue
            state = f.optimizer.state_dict()["state"]
            for i, name in enumerate(f.names):
                if i in state:
                    out[name] = {k: v for k, v in state[i].items()}
        return out

    def hyperparameters(self) -> list[dict[str, Any]]:
        """The decay / no-decay groups' settings (what ``build_optimizer`` puts in a single process's groups)."""
        return [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]

    def load_named_state(self, named: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore from per-parameter state by name (every rank passes the state of all its parameters; ZeRO
        keeps its own shard)."""
        for f in self.families:
            full = f.optimizer.state_dict() if not f.sharded else _zero_layout(f.optimizer)
            state = {i: named[n] for i, n in enumerate(f.names) if n in named}
            f.optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


def _zero_layout(opt: ZeroRedundancyOptimizer) -> dict[str, Any]:
    """The param_groups a ZeRO ``state_dict`` would carry (global indices over its groups), without gathering."""
    groups, start = [], 0
    for g in opt.param_groups:
        n = len(g["params"])
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(start, start + n))})
        start += n
    return {"param_groups": groups}


def zero_optimizer(model: nn.Module, groups: ProcessGroups, **kw: Any) -> ShardedAdamW:
    """The trainer's optimizer under ZeRO-1 (``Strategy.make_optimizer``)."""
    return ShardedAdamW(model, groups, **kw)
