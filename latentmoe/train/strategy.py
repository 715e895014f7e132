"""What the trainer needs from "one process" or "many": the Strategy protocol and its single-process form.

The :class:`~latentmoe.train.trainer.Trainer` runs the same loop whatever the layout; every place where one
process and W processes differ is a method here::

    prepare_model(model)            shard what this rank holds (experts over the EP group, layers over the
                                    pipeline stages, ...) in place, or return the part of it this rank holds
    make_optimizer(model, ...)      the optimizer of this rank's parameters (ZeRO shards its state)
    shard_batch(ids_BS)             this rank's rows of the global batch
    batch_rows()                    (index, count): which share of the global batch's rows is this rank's, for a
                                    batch source that reads only its own rows (trainer.RankBatches)
    begin_step / end_step           per-step bookkeeping (communication counters)
    forward_backward(model, ids, loss_fn, ...)
                                    forward, loss, backward of this rank's rows -> StepStats: the global mean
                                    losses, the expert load of the whole global batch, "does any rank want to
                                    stop?" (a pipeline schedule runs forward and backward itself, interleaved)
    reduce_and_clip(model, c)       gradients reduced to those of the global mean loss, clipped by the global norm
    all_finite(flag)                True only when every rank says True (non-finite weights stop all ranks)
    evaluate(model, batches, ...)   validation loss over the batches' rows split across ranks
    window_metrics(steps)           extra metrics of a logging window (traffic counters)
    save_checkpoint / load_checkpoint, barrier, broadcast_object, is_main
    record_layout(out_dir, ...)     describe the layout in the run directory (e.g. ep_layout.json)
    errors()                        a context in which transport failures become one-line errors

:class:`SingleProcess` is the plain implementation; ``latentmoe.parallel.strategy.ExpertParallelStrategy`` is the
expert + data parallel one (it uses only this package's public API).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from latentmoe.checkpoint import load_checkpoint, save_checkpoint
from latentmoe.config import ModelConfig
from latentmoe.train.evaluate import evaluate
from latentmoe.train.optim import build_optimizer


@dataclass(frozen=True)
class LossStats:
    """A step's losses as plain floats (global means under several processes)."""

    total: float
    main: float
    mtp: list[float]
    balance: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.total)


@dataclass(frozen=True)
class StepLoss:
    """One forward's losses as tensors: ``total`` is what backward differentiates; ``main``, ``mtp`` (one per
    depth) and ``balance`` (the unweighted sequence-wise balance loss, None without MoE) are its parts."""

    total: torch.Tensor
    main: torch.Tensor
    mtp: list[torch.Tensor]
    balance: torch.Tensor | None


# (model output with .logits / .mtp_logits / .balance_loss, ids_bS) -> StepLoss: the trainer's loss definition.
LossFn = Callable[[Any, torch.Tensor, "torch.Tensor | None"], StepLoss]  # (out, ids_bS, loss_mask_bS)
ForwardContext = Callable[[], contextlib.AbstractContextManager]  # entered around every forward (autocast)


@dataclass(frozen=True)
class StepStats:
    """What one forward-backward reports. ``losses``: global means; ``expert_load``: ``[n_moe_layers, E]`` fp32
    assignment counts summed over the whole global batch (every rank gets the same tensor; it drives the
    router-bias update); ``stop``: some rank asked to stop after this step."""

    losses: LossStats
    expert_load: torch.Tensor
    stop: bool


class Strategy(Protocol):
    """How a run is laid over processes; see the module docstring for what each method means."""

    is_main: bool
    world_size: int

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def make_optimizer(self, model: nn.Module, **kw: Any) -> torch.optim.Optimizer: ...

    def shard_batch(self, ids_BS: torch.Tensor) -> torch.Tensor: ...

    def batch_rows(self) -> tuple[int, int]: ...

    def begin_step(self, model: nn.Module) -> None: ...

    def end_step(self, model: nn.Module) -> None: ...

    def forward_backward(
        self, model: nn.Module, ids_bS: torch.Tensor, loss_fn: LossFn, *, forward_context: ForwardContext,
        stop: bool, loss_mask_bS: torch.Tensor | None = None,
    ) -> StepStats: ...

    def reduce_and_clip(self, model: nn.Module, max_norm: float) -> torch.Tensor: ...

    def all_finite(self, flag: bool) -> bool: ...

    def evaluate(
        self, model: nn.Module, batches: Iterable[torch.Tensor], *, max_batches: int | None, precision: str
    ) -> float: ...

    def window_metrics(self, steps: int) -> dict[str, Any]: ...

    def save_checkpoint(
        self, out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any], config: ModelConfig, *, keep_last: int | None, owner_kind: str,
    ) -> Path: ...

    def load_checkpoint(
        self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, check_hashes: bool
    ) -> dict[str, Any]: ...

    def barrier(self) -> None: ...

    def broadcast_object(self, value: Any) -> Any: ...

    def record_layout(self, out_dir: Path, config: ModelConfig, *, kind: str) -> None: ...

    def errors(self) -> contextlib.AbstractContextManager: ...


class SingleProcess:
    """One process holds the whole model and the whole batch."""

    is_main = True
    world_size = 1

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def make_optimizer(self, model: nn.Module, **kw: Any) -> torch.optim.Optimizer:
        return build_optimizer(model, **kw)

    def shard_batch(self, ids_BS: torch.Tensor) -> torch.Tensor:
        return ids_BS

    def batch_rows(self) -> tuple[int, int]:
        return 0, 1

    def begin_step(self, model: nn.Module) -> None:
        pass

    def end_step(self, model: nn.Module) -> None:
        pass

    def forward_backward(
        self, model: nn.Module, ids_bS: torch.Tensor, loss_fn: LossFn, *, forward_context: ForwardContext,
        stop: bool, loss_mask_bS: torch.Tensor | None = None,
    ) -> StepStats:
        return forward_backward_whole(self, model, ids_bS, loss_fn, forward_context=forward_context, stop=stop,
                                      loss_mask_bS=loss_mask_bS)

    def reduce_losses(
        self, total: torch.Tensor, main: torch.Tensor, mtp: Sequence[torch.Tensor], balance: torch.Tensor | None,
        *, stop: bool,
    ) -> tuple[LossStats, bool]:
        stats = LossStats(
            total=float(total.detach()),
            main=float(main.detach()),
            mtp=[float(m.detach()) for m in mtp],
            balance=float(balance.detach()) if balance is not None else 0.0,
        )
        return stats, stop

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach()

    def reduce_and_clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def all_finite(self, flag: bool) -> bool:
        return flag

    def evaluate(
        self, model: nn.Module, batches: Iterable[torch.Tensor], *, max_batches: int | None, precision: str
    ) -> float:
        return evaluate(model, batches, max_batches=max_batches, precision=precision)

    def window_metrics(self, steps: int) -> dict[str, Any]:
        return {}

    def save_checkpoint(
        self, out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any], config: ModelConfig, *, keep_last: int | None, owner_kind: str,
    ) -> Path:
        return save_checkpoint(out_dir, step, model, optimizer, trainer_state, config, keep_last=keep_last,
                               owner_kind=owner_kind)

    def load_checkpoint(
        self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, check_hashes: bool
    ) -> dict[str, Any]:
        return load_checkpoint(path, model, optimizer, check_hashes=check_hashes)

    def barrier(self) -> None:
        pass

    def broadcast_object(self, value: Any) -> Any:
        return value

    def record_layout(self, out_dir: Path, config: ModelConfig, *, kind: str) -> None:
        pass

    def errors(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class _LossReducer(Protocol):
    def reduce_losses(
        self, total: torch.Tensor, main: torch.Tensor, mtp: Sequence[torch.Tensor], balance: torch.Tensor | None,
        *, stop: bool,
    ) -> tuple[LossStats, bool]: ...

    def sum(self, t: torch.Tensor) -> torch.Tensor: ...


def forward_backward_whole(
    strategy: _LossReducer, model: nn.Module, ids_bS: torch.Tensor, loss_fn: LossFn, *,
    forward_context: ForwardContext, stop: bool, loss_mask_bS: torch.Tensor | None = None,
) -> StepStats:
    """One forward of the whole model over this rank's rows, the loss, and its backward — skipped when the global
    loss is not finite (the step is then dropped by the trainer). ``strategy`` reduces the losses and the load."""
    with forward_context():
        out = model(ids_bS)
        loss = loss_fn(out, ids_bS, loss_mask_bS)
    # Global means; the stop flag rides along, so every rank takes the same branch.
    stats, stop = strategy.reduce_losses(loss.total, loss.main, loss.mtp, loss.balance, stop=stop)
    load = strategy.sum(out.expert_load)
    if stats.finite:
        loss.total.backward()
    return StepStats(stats, load, stop)
