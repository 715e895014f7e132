"""Distributed training glue: what the Trainer does differently on W ranks (its ``distributed`` hook).

The same command line means the same training on 1 or W processes. ``--batch-size`` is the *global*
batch (sequences per optimizer step); each rank takes its rows of the step's batch, a pure function of
(seed, step) on every rank. One optimizer step on rank r of W::

    ids_bS   = ids_BS[r·B/W : (r+1)·B/W]             this rank's rows of the global batch
    loss_r   = mean over its rows                    local mean; every rank has the same row count
    (loss, main, mtp, balance, stop) all-reduced     global mean = mean of the W local means, logged
    backward                                         expert grads arrive through the all-to-all backward
    dense grads:  all_reduce(SUM) over the world / W           = grad of the global mean loss
    expert grads: all_reduce(SUM) over the expert-DP group / W (the ranks holding the same experts)
    grad norm²  = dense² + Σ over the EP group of expert²      every rank clips with the same factor
    AdamW step (elementwise, on each rank's own tensors)
    expert load all-reduced(SUM), then the router-bias update   identical biases everywhere

With fp32 payloads every step's loss equals the single-process run's within float rounding (test:
1e-5 relative). Rank 0 alone writes metrics, plots and the non-expert part of checkpoints; each EP rank
writes its own experts (``latentmoe.parallel.checkpoint``). Ctrl-C on any rank stops all ranks at the
same step (the stop flag rides on the loss all-reduce).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from latentmoe.config import ConfigError
from latentmoe.parallel.ep import (
    enable_expert_parallel,
    exposed_comm_seconds,
    is_expert_parameter,
    moe_layers,
    reset_traffic,
    total_traffic,
)
from latentmoe.parallel.topology import (
    DEFAULT_TIMEOUT_S,
    ProcessGroups,
    Topology,
    TopologyError,
    build_groups,
    env_world,
    experts_per_rank,
    init_distributed,
)
from latentmoe.parallel.traffic import TrafficCounters, summarize_over_ranks

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s epsilon, so the clip factor matches the single process


class _NullMetrics:
    """Metrics writer of ranks other than 0: records are computed (they involve collectives) but not written."""

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        from latentmoe.train.metrics import _clean

        return _clean(record)

    def close(self) -> None:
        pass


class DistributedTraining:
    """The ``Trainer(distributed=...)`` hook for an EP + DP run (see the module docstring).

    groups: this rank's process groups (``build_groups``); the model passed to the trainer must already be
    sharded with :func:`~latentmoe.parallel.ep.enable_expert_parallel` (or be unsharded with EP size 1).
    """

    def __init__(self, groups: ProcessGroups) -> None:
        self.groups = groups
        self.topology = groups.topology
        self.world_size = self.topology.world_size
        self.is_main = self.topology.rank == 0
        self._window = TrafficCounters()
        self._window_exposed_s = 0.0
        # NCCL reduces only CUDA tensors; gloo takes CPU ones.
        self.device = comm_device()

    # ------------------------------------------------------------------ data
    def shard_batch(self, ids_BS: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the global batch."""
        B = ids_BS.shape[0]
        if B % self.world_size:
            raise ConfigError(
                f"batch_size ({B}) must be a multiple of the world size ({self.world_size}): it is the global "
                "batch, split evenly over the ranks"
            )
        b = B // self.world_size
        r = self.topology.rank
        return ids_BS[r * b : (r + 1) * b]

    def begin_step(self, model: nn.Module, ids_BS: torch.Tensor) -> torch.Tensor:
        reset_traffic(model)
        return self.shard_batch(ids_BS)

    def end_step(self, model: nn.Module) -> None:
        """Add this step's EP traffic to the logging window (local; summed over ranks when logged)."""
        self._window.merge(total_traffic(model))
        self._window_exposed_s += exposed_comm_seconds(model)

    # ------------------------------------------------------------------ reductions
    def mean_losses(
        self, total: torch.Tensor, main: torch.Tensor, mtp: Sequence[torch.Tensor], balance: torch.Tensor | None,
        *, stop: bool,
    ) -> tuple[dict[str, Any], bool]:
        """Global means of the step's losses (one all-reduce) and whether any rank asked to stop."""
        parts = [total.detach().float(), main.detach().float(), *[m.detach().float() for m in mtp]]
        parts.append(balance.detach().float() if balance is not None else torch.zeros(()))
        parts.append(torch.tensor(float(stop)))
        vec = torch.stack([p.reshape(()).to(self.device) for p in parts])
        dist.all_reduce(vec, group=self.groups.world)
        means = (vec[:-1] / self.world_size).tolist()
        n_mtp = len(mtp)
        stats = {"total": means[0], "main": means[1], "mtp": means[2 : 2 + n_mtp], "balance": means[2 + n_mtp]}
        return stats, bool(vec[-1] > 0)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce(SUM) over the world (e.g. the expert load that drives the router-bias update)."""
        out = t.detach().clone()
        dist.all_reduce(out, group=self.groups.world)
        return out

    def reduce_gradients(self, model: nn.Module) -> None:
        """Average dense gradients over the world and expert gradients over the expert-DP group (÷ world)."""
        dense, expert = _split_params(model)
        _all_reduce_grads([p for p in dense if p.grad is not None], self.groups.world, self.world_size)
        for p in expert:  # an expert slice no token reached still steps, as in the single process
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        _all_reduce_grads(expert, self.groups.expert_dp, self.world_size)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip by the global norm (dense grads are identical on every rank; expert grads differ over the EP
        group); returns the norm before clipping, the same on every rank."""
        dense, expert = _split_params(model)
        dense_sq = _sum_sq((p.grad for p in dense if p.grad is not None), self.device)
        expert_sq = _sum_sq((p.grad for p in expert if p.grad is not None), self.device)
        if self.groups.ep is not None:
            dist.all_reduce(expert_sq, group=self.groups.ep)
        total = (dense_sq + expert_sq).sqrt()
        clip = (max_norm / (total + CLIP_EPS)).clamp(max=1.0)
        if math.isfinite(float(total)):
            for p in (*dense, *expert):
                if p.grad is not None:
                    p.grad.mul_(clip.to(p.grad.dtype))
        return total

    def reduce_and_clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        self.reduce_gradients(model)
        return self.clip_grad_norm_(model, max_norm)

    # ------------------------------------------------------------------ evaluation and metrics
    def evaluate(
        self, model: nn.Module, batches: Iterable[torch.Tensor], *, max_batches: int | None, precision: str
    ) -> float:
        """Validation loss over each batch's rows split across ranks, averaged over the world."""
        from latentmoe.train.trainer import evaluate

        local = evaluate(model, (self.shard_batch(b) for b in batches), max_batches=max_batches, precision=precision)
        vec = torch.tensor([local], dtype=torch.float64, device=self.device)
        dist.all_reduce(vec, group=self.groups.world)
        return float(vec) / self.world_size

    def window_metrics(self, steps: int) -> dict[str, Any]:
        """``a2a_*`` metrics of the steps since the last record, per step (collective)."""
        n_bins = self.topology.n_nodes + 1
        summary = summarize_over_ranks(
            self._window, self.groups.world, n_bins=n_bins, steps=max(steps, 1), device=self.device
        )
        exposed = torch.tensor([self._window_exposed_s], dtype=torch.float64, device=self.device)
        dist.all_reduce(exposed, op=dist.ReduceOp.MAX, group=self.groups.world)
        self._window = TrafficCounters()
        self._window_exposed_s = 0.0
        record = summary.metrics()
        record["a2a_exposed_comm_s"] = float(exposed) / max(steps, 1)
        return record

    def metrics_writer(self, out_dir, *, resume_step: int | None):
        from latentmoe.train.metrics import MetricsWriter

        if self.is_main:
            return MetricsWriter(out_dir, resume_step=resume_step)
        return _NullMetrics()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, trainer) -> Any:
        from latentmoe.parallel.checkpoint import save_sharded_checkpoint

        return save_sharded_checkpoint(
            trainer.out_dir,
            trainer.step,
            trainer.model,
            trainer.optimizer,
            trainer.state_dict(),
            trainer.model_config,
            groups=self.groups,
            keep_last=trainer.cfg.keep_last,
        )

    def load_checkpoint(self, path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        from latentmoe.parallel.checkpoint import load_sharded_checkpoint

        return load_sharded_checkpoint(path, model, optimizer, groups=self.groups)


def _split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    dense, expert, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (expert if is_expert_parameter(name) else dense).append(p)
    return dense, expert


def _sum_sq(grads: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        total = total + g.detach().float().pow(2).sum().to(device)
    return total


def comm_device() -> torch.device:
    """The device collectives of small host values must use: the current CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_grads(params: list[nn.Parameter], group, divide_by: int) -> None:
    """One flat all-reduce(SUM) of the gradients, then ÷ ``divide_by`` (the world: grad of the global mean)."""
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


# ---------------------------------------------------------------------------------------------- set-up


@dataclass(frozen=True)
class ParallelConfig:
    """How to lay a training run over processes (the CLI's ``--ep``, ``--gpus-per-node``, ``--ep-*``).

    ep: EP size (ranks sharing one copy of the experts; must divide the world size and n_routed_experts);
    gpus_per_node: ranks per node (None: all ranks on one node); dispatch / combine: payload codecs;
    overlap: dual micro-batch overlap in the MoE layers; timeout_s: collective timeout.
    """

    ep: int = 1
    gpus_per_node: int | None = None
    dispatch: str = "fp32"
    combine: str = "fp32"
    overlap: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S

    def topology(self, rank: int, world_size: int) -> Topology:
        return Topology(
            world_size=world_size,
            rank=rank,
            gpus_per_node=self.gpus_per_node or world_size,
            ep_size=self.ep,
        )


LAYOUT_FILE = "ep_layout.json"


def start_parallel(parallel: ParallelConfig) -> ProcessGroups | None:
    """Start torch.distributed from torchrun's environment and build the groups; None for one process.

    Raises :class:`TopologyError` for a layout that cannot work (e.g. ``--ep 4`` on 2 processes)."""
    _, world_size, _ = env_world()
    if world_size == 1 and parallel.ep == 1:
        return None
    if parallel.ep > world_size:
        raise TopologyError(
            f"--ep {parallel.ep} needs at least {parallel.ep} processes, this run has {world_size} "
            "(launch with torchrun --nproc-per-node N)"
        )
    init_distributed(timeout_s=parallel.timeout_s)
    return build_groups(parallel.topology(dist.get_rank(), dist.get_world_size()))


def attach(model: nn.Module, groups: ProcessGroups, parallel: ParallelConfig) -> DistributedTraining:
    """Shard ``model``'s experts over the EP group (in place) and return the trainer's hook."""
    if groups.topology.ep_size > 1:
        for moe in moe_layers(model):
            experts_per_rank(moe.config.n_routed_experts, groups.topology.ep_size)
        enable_expert_parallel(
            model, groups, dispatch=parallel.dispatch, combine=parallel.combine, overlap=parallel.overlap
        )
    return DistributedTraining(groups)


def write_layout(out_dir, groups: ProcessGroups, parallel: ParallelConfig, config) -> None:
    """``ep_layout.json`` in the run directory (rank 0): what ``latentmoe ep-report`` describes the run with."""
    from latentmoe.config import write_text_atomic

    topo = groups.topology
    data = {
        "world_size": topo.world_size,
        "gpus_per_node": topo.gpus_per_node,
        "n_nodes": topo.n_nodes,
        "ep_size": topo.ep_size,
        "dp_size": topo.dp_size,
        "dispatch": parallel.dispatch,
        "combine": parallel.combine,
        "overlap": parallel.overlap,
        "n_routed_experts": config.n_routed_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "n_group": config.n_group,
        "topk_group": config.topk_group,
        "hidden_size": config.hidden_size,
        "backend": dist.get_backend(),
    }
    write_text_atomic(Path(out_dir) / LAYOUT_FILE, json.dumps(data, indent=1) + "\n")


def is_main_process() -> bool:
    """Rank 0 of a started process group, or a single process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Tear the process group down (end of a distributed CLI run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class CollectiveError(RuntimeError):
    """A collective failed on this rank: a peer died or stopped responding within the collective timeout."""


_TRANSPORT_FAILURES = ("Timed out", "timed out", "Connection closed", "Connection reset", "Broken pipe", "NCCL")


@contextlib.contextmanager
def collective_errors(groups: ProcessGroups | None, timeout_s: float):
    """Turn the backend's transport errors (gloo/NCCL timeouts, closed connections) into :class:`CollectiveError`
    naming this rank, so a run whose peer died ends with one clear line instead of a backend traceback."""
    try:
        yield
    except (dist.DistError, RuntimeError) as exc:
        text = str(exc)
        if groups is None or not (isinstance(exc, dist.DistError) or any(m in text for m in _TRANSPORT_FAILURES)):
            raise
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise CollectiveError(
            f"rank {groups.topology.rank} of {groups.topology.world_size}: a collective failed — a peer rank "
            f"died or stopped responding (collective timeout {timeout_s:.0f} s): {first[:200]}"
        ) from exc
