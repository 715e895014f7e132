"""The expert + data parallel Strategy: what the Trainer does differently on W ranks (latentmoe.train.strategy).

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
writes its own experts (``latentmoe.parallel.checkpoint``). SIGINT/SIGTERM on any rank stops all ranks at
the same step (the stop flag rides on the loss all-reduce). This module uses only the public API of
``latentmoe.train``; starting and stopping the processes is ``latentmoe.parallel.runtime``'s.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from latentmoe.config import ConfigError, ModelConfig
from latentmoe.io import write_json_atomic
from latentmoe.parallel.checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from latentmoe.parallel.ep import (
    enable_expert_parallel,
    exposed_comm_seconds,
    moe_layers,
    reset_traffic,
    total_traffic,
)
from latentmoe.parallel.grads import all_reduce_grads, split_named_params, sum_sq
from latentmoe.parallel.pp.strategy import PipelineConfig
from latentmoe.parallel.runtime import (
    DEFAULT_TIMEOUT_S,
    collective_errors,
    comm_device,
    env_world,
    init_distributed,
)
from latentmoe.parallel.topology import ProcessGroups, Topology, TopologyError, build_groups, experts_per_rank
from latentmoe.parallel.traffic import TrafficCounters, summarize_over_ranks
from latentmoe.train import (
    ForwardContext,
    LossFn,
    LossStats,
    SingleProcess,
    StepStats,
    Strategy,
    build_optimizer,
    claim_run_file,
    evaluate,
    forward_backward_whole,
)

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s epsilon, so the clip factor matches the single process
LAYOUT_FILE = "ep_layout.json"


@dataclass(frozen=True)
class ParallelConfig:
    """How to lay a training run over processes (the CLI's ``--ep``, ``--gpus-per-node``, ``--ep-*``).

    ep: EP size (ranks sharing one copy of the experts; must divide the world size and n_routed_experts);
    gpus_per_node: ranks per node (None: all ranks on one node); dispatch / combine: payload codecs;
    overlap: dual micro-batch overlap in the MoE layers; timeout_s: collective timeout; pipeline: the pipeline
    half (``--pp`` and friends; None or ``pp == 1``: no pipeline, this module's strategy).
    """

    ep: int = 1
    gpus_per_node: int | None = None
    dispatch: str = "fp32"
    combine: str = "fp32"
    overlap: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    pipeline: PipelineConfig | None = None

    @property
    def pp(self) -> int:
        return self.pipeline.pp if self.pipeline is not None else 1

    def topology(self, rank: int, world_size: int) -> Topology:
        return Topology(
            world_size=world_size,
            rank=rank,
            gpus_per_node=self.gpus_per_node or world_size,
            ep_size=self.ep,
            pp_size=self.pp,
        )


class ExpertParallelStrategy:
    """The :class:`~latentmoe.train.strategy.Strategy` of an EP + DP run (see the module docstring).

    groups: this rank's process groups (``build_groups``). :meth:`prepare_model` shards the model's experts over
    the EP group in place (nothing to do with EP size 1: plain data parallelism).
    """

    def __init__(self, groups: ProcessGroups, parallel: ParallelConfig | None = None) -> None:
        self.groups = groups
        self.parallel = parallel or ParallelConfig()
        self.topology = groups.topology
        self.world_size = self.topology.world_size
        self.is_main = self.topology.rank == 0
        self._window = TrafficCounters()
        self._window_exposed_s = 0.0
        # NCCL reduces only CUDA tensors; gloo takes CPU ones.
        self.device = comm_device()

    # ------------------------------------------------------------------ model and data
    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.topology.ep_size > 1:
            for moe in moe_layers(model):
                experts_per_rank(moe.config.n_routed_experts, self.topology.ep_size)
            enable_expert_parallel(
                model, self.groups, dispatch=self.parallel.dispatch, combine=self.parallel.combine,
                overlap=self.parallel.overlap,
            )
        return model

    def make_optimizer(self, model: nn.Module, **kw: Any) -> torch.optim.Optimizer:
        return build_optimizer(model, **kw)

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

    def batch_rows(self) -> tuple[int, int]:
        """Every rank takes its own share of the global batch's rows (the split :meth:`shard_batch` makes)."""
        return self.topology.rank, self.world_size

    def begin_step(self, model: nn.Module) -> None:
        reset_traffic(model)

    def end_step(self, model: nn.Module) -> None:
        """Add this step's EP traffic to the logging window (local; summed over ranks when logged)."""
        self._window.merge(total_traffic(model))
        self._window_exposed_s += exposed_comm_seconds(model)

    # ------------------------------------------------------------------ reductions
    def forward_backward(
        self, model: nn.Module, ids_bS: torch.Tensor, loss_fn: LossFn, *, forward_context: ForwardContext,
        stop: bool, loss_mask_bS: torch.Tensor | None = None,
    ) -> StepStats:
        """The whole model on this rank's rows (experts across the EP group): losses and load all-reduced."""
        return forward_backward_whole(self, model, ids_bS, loss_fn, forward_context=forward_context, stop=stop,
                                      loss_mask_bS=loss_mask_bS)

    def reduce_losses(
        self, total: torch.Tensor, main: torch.Tensor, mtp: Sequence[torch.Tensor], balance: torch.Tensor | None,
        *, stop: bool,
    ) -> tuple[LossStats, bool]:
        """Global means of the step's losses (one all-reduce) and whether any rank asked to stop."""
        parts = [total.detach().float(), main.detach().float(), *[m.detach().float() for m in mtp]]
        parts.append(balance.detach().float() if balance is not None else torch.zeros(()))
        parts.append(torch.tensor(float(stop)))
        vec = torch.stack([p.reshape(()).to(self.device) for p in parts])
        dist.all_reduce(vec, group=self.groups.world)
        means = (vec[:-1] / self.world_size).tolist()
        n_mtp = len(mtp)
        stats = LossStats(total=means[0], main=means[1], mtp=means[2 : 2 + n_mtp], balance=means[2 + n_mtp])
        return stats, bool(vec[-1] > 0)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce(SUM) over the world (e.g. the expert load that drives the router-bias update)."""
        out = t.detach().clone()
        dist.all_reduce(out, group=self.groups.world)
        return out

    def all_finite(self, flag: bool) -> bool:
        vec = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(vec, op=dist.ReduceOp.MIN, group=self.groups.world)
        return bool(vec[0] > 0)

    def reduce_gradients(self, model: nn.Module) -> None:
        """Average dense gradients over the world and expert gradients over the expert-DP group (÷ world)."""
        dense, expert = _split_params(model)
        all_reduce_grads([p for p in dense if p.grad is not None], self.groups.world, self.world_size)
        for p in expert:  # an expert slice no token reached still steps, as in the single process
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_grads(expert, self.groups.expert_dp, self.world_size)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip by the global norm (dense grads are identical on every rank; expert grads differ over the EP
        group); returns the norm before clipping, the same on every rank."""
        dense, expert = _split_params(model)
        dense_sq = sum_sq((p.grad for p in dense if p.grad is not None), self.device)
        expert_sq = sum_sq((p.grad for p in expert if p.grad is not None), self.device)
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

    # ------------------------------------------------------------------ checkpoints and control
    def save_checkpoint(
        self, out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any], config: ModelConfig, *, keep_last: int | None, owner_kind: str,
    ) -> Path:
        return save_sharded_checkpoint(out_dir, step, model, optimizer, trainer_state, config, groups=self.groups,
                                       keep_last=keep_last, owner_kind=owner_kind)

    def load_checkpoint(
        self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, check_hashes: bool
    ) -> dict[str, Any]:
        return load_sharded_checkpoint(path, model, optimizer, check_hashes=check_hashes)

    def barrier(self) -> None:
        dist.barrier(group=self.groups.world)

    def broadcast_object(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.groups.world)
        return box[0]

    def errors(self):
        """Context manager: transport failures become one CollectiveError line naming this rank."""
        return collective_errors(self.topology.rank, self.world_size, self.parallel.timeout_s)

    def record_layout(self, out_dir: str | Path, config: ModelConfig, *, kind: str) -> None:
        """``ep_layout.json`` in the run directory (rank 0): what ``latentmoe ep-report`` describes the run with."""
        topo = self.topology
        data = {
            "world_size": topo.world_size,
            "gpus_per_node": topo.gpus_per_node,
            "n_nodes": topo.n_nodes,
            "ep_size": topo.ep_size,
            "dp_size": topo.dp_size,
            "dispatch": self.parallel.dispatch,
            "combine": self.parallel.combine,
            "overlap": self.parallel.overlap,
            "n_routed_experts": config.n_routed_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "n_group": config.n_group,
            "topk_group": config.topk_group,
            "hidden_size": config.hidden_size,
            "backend": dist.get_backend(),
        }
        write_json_atomic(Path(out_dir) / LAYOUT_FILE, data)
        claim_run_file(out_dir, LAYOUT_FILE, kind=kind)


def _split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    dense, expert = split_named_params(model)
    return [p for _, p in dense], [p for _, p in expert]


# ---------------------------------------------------------------------------------------------- set-up


def start_strategy(parallel: ParallelConfig | None = None, *, device: str | torch.device | None = None) -> Strategy:
    """The strategy for this process: :class:`SingleProcess` outside torchrun (with ``--ep 1 --pp 1``), else start
    torch.distributed from torchrun's environment (gloo on CPU, NCCL on CUDA) and build the groups:
    :class:`~latentmoe.parallel.pp.strategy.PipelineStrategy` with ``--pp > 1``, :class:`ExpertParallelStrategy`
    otherwise.

    Raises :class:`TopologyError` for a layout that cannot work (e.g. ``--ep 4`` on 2 processes)."""
    parallel = parallel or ParallelConfig()
    _, world_size, _ = env_world()
    if world_size == 1 and parallel.ep == 1 and parallel.pp == 1:
        return SingleProcess()
    needed = parallel.ep * parallel.pp
    if needed > world_size:
        flags = " x ".join(f for f in (f"--pp {parallel.pp}" if parallel.pp > 1 else "",
                                        f"--ep {parallel.ep}" if parallel.ep > 1 else "") if f)
        raise TopologyError(
            f"{flags} needs at least {needed} processes, this run has {world_size} "
            "(launch with torchrun --nproc-per-node N)"
        )
    topology = parallel.topology(env_world()[0], world_size)  # layout errors before any process group starts
    init_distributed(device=device, timeout_s=parallel.timeout_s)
    overlap_pairs = parallel.pipeline is not None and parallel.pipeline.overlap_f_b
    groups = build_groups(topology, ep_backward=overlap_pairs)
    if parallel.pp > 1:
        from latentmoe.parallel.pp.strategy import PipelineStrategy

        return PipelineStrategy(groups, parallel, parallel.pipeline)
    return ExpertParallelStrategy(groups, parallel)
