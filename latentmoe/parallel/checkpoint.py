"""The collective steps of saving and loading an expert-parallel checkpoint (the format is latentmoe.checkpoint's).

Saving, on every rank of the world::

    rank 0 creates the temporary directory          checkpoint.begin_checkpoint
    broadcast its path                               (every rank writes into it: a shared filesystem is assumed)
    DP rank 0 of each EP group: its expert shard     checkpoint.write_expert_shard  (model-experts-R-of-P ...)
    rank 0: the rest                                 checkpoint.write_main_files
    all-reduce(MIN) of "my part succeeded"           doubles as the barrier; one failure aborts every rank
    rank 0 commits                                   checkpoint.commit_checkpoint (manifest, fsync, rename)
    barrier                                          nobody returns before the checkpoint exists

Only the first EP group (DP rank 0) writes expert shards; the other groups hold identical copies. Loading is the
single-process loader with this rank's EP index: the shards are merged and this rank's slice cut
(``checkpoint.load_checkpoint(..., ep_rank=...)``), so any layout — one process, the same EP size, another — loads.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from latentmoe import checkpoint as ckpt
from latentmoe.config import ModelConfig
from latentmoe.parallel.ep import ExpertParallel, moe_layers
from latentmoe.parallel.topology import ProcessGroups

EP_STATE_KEY = "expert_parallel"


def ep_rank_of(model: nn.Module) -> int:
    """This rank's index in its EP group, read from the model's MoE hooks (0 for an unsharded model)."""
    for moe in moe_layers(model):
        hook = moe.expert_parallel
        if isinstance(hook, ExpertParallel):
            if not hook.placement.is_contiguous:
                raise ckpt.CheckpointError("checkpoints load into the contiguous expert placement (undo EPLB first)")
            return hook.ep_rank
    return 0


def save_sharded_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    config: ModelConfig,
    *,
    groups: ProcessGroups,
    keep_last: int | None = None,
    owner_kind: str = ckpt.RUN_KIND,
) -> Path:
    """Write ``out_dir/checkpoint-STEP`` from every rank (collective); returns its path on every rank."""
    topo = groups.topology
    return collective_commit(
        out_dir, step, lambda tmp: _write_rank_files(tmp, model, optimizer, topo, config), trainer_state,
        rank=topo.rank, world=groups.world, keep_last=keep_last, owner_kind=owner_kind,
        extra_state={EP_STATE_KEY: {"ep_size": topo.ep_size}})


def collective_commit(
    out_dir: str | os.PathLike,
    step: int,
    write_parts: Callable[[Path], None],
    trainer_state: dict[str, Any],
    *,
    rank: int,
    world: dist.ProcessGroup,
    keep_last: int | None,
    owner_kind: str,
    extra_state: dict[str, Any],
) -> Path:
    """The collective skeleton every sharded save shares: rank 0 opens the temporary directory and broadcasts it,
    every rank runs ``write_parts(tmp)``, an all-reduce(MIN) of "my part succeeded" (one failure aborts all), rank 0
    commits and prunes, a barrier. Returns the committed path on every rank."""
    out_dir = Path(out_dir)
    box: list[Any] = [str(ckpt.begin_checkpoint(out_dir, step)) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=world)
    tmp = Path(box[0])
    ok = torch.ones(1)
    try:
        write_parts(tmp)
    except BaseException:
        ok.zero_()
        raise
    finally:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=world)
    final = out_dir / ckpt.checkpoint_name(step)
    if not bool(ok):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # our temporary directory: only our files are in it
        raise ckpt.CheckpointError(f"{final}: another rank failed to write its part of the checkpoint")
    if rank == 0:
        try:
            ckpt.commit_checkpoint(tmp, out_dir, step, trainer_state, owner_kind=owner_kind, extra_state=extra_state)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # the temporary begin_checkpoint made for this save: ours alone
            raise
        if keep_last is not None:
            ckpt.prune_checkpoints(out_dir, keep_last=keep_last)
    dist.barrier(group=world)
    return final


def _write_rank_files(tmp: Path, model, optimizer, topo, config: ModelConfig) -> None:
    rest, experts = ckpt.split_experts(ckpt.model_tensors(model))
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_meta: dict[str, str] = {}
    expert_idx: set[int] = set()
    if optimizer is not None:
        opt_tensors, opt_meta = ckpt.flatten_optimizer_state(optimizer.state_dict())
        expert_idx = ckpt.expert_state_indices(model, optimizer)
    mine = {k: t for k, t in opt_tensors.items() if ckpt.is_expert_state(k, t, expert_idx)}
    if topo.dp_rank == 0:
        ckpt.write_expert_shard(tmp, rank=topo.ep_rank, size=topo.ep_size, tensors=experts,
                                optimizer_tensors=mine if optimizer is not None else None)
    if topo.rank == 0:
        rest_opt = {k: t for k, t in opt_tensors.items() if k not in mine}
        ckpt.write_main_files(tmp, tensors=rest, config=config,
                              optimizer_tensors=rest_opt if optimizer is not None else None,
                              optimizer_metadata=opt_meta)


def load_sharded_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    check_hashes: bool = True,
) -> dict[str, Any]:
    """Load any checkpoint (sharded or not) into ``model`` (full or EP-sharded) and ``optimizer``; returns the
    trainer state. Every file's size and sha256 is checked first."""
    return ckpt.load_checkpoint(path, model, optimizer, ep_rank=ep_rank_of(model), check_hashes=check_hashes)
