"""Checkpoints of a PP × EP × DP run, in the single-process format, so that any layout resumes any other.

A pipeline checkpoint is exactly what one process or an EP run writes (``latentmoe.checkpoint``):
``model.safetensors`` (every non-expert tensor of every stage), ``model-experts-R-of-P`` (EP slice R of every MoE
layer of every stage; with EP 1 the experts stay in ``model.safetensors``), ``optimizer.safetensors`` /
``optimizer-experts-*`` (AdamW state under the *single-process* parameter indices), ``trainer_state.json``. So a run
saved at PP2 × EP2 resumes at PP1 × EP4, PP2 × DP2, one process, or converts to the HF layout, with nothing but the
existing readers; resuming at the same layout is bit-exact (every tensor round-trips through safetensors).

Saving is collective (every rank of the world)::

    rank 0 creates the temporary directory, broadcasts its path
    ZeRO families consolidate their optimizer shards on their group's first rank    (torch's consolidate_state_dict)
    stage-rank 0 of every stage  → rank 0          non-expert tensors + their AdamW state  (gather along a pipeline)
    DP-rank 0, EP-rank e, every stage → stage 0's EP rank e    expert slices + moments      (gather along a pipeline)
    every DP-rank-0 rank → rank 0                  the AdamW step counters of its expert slices (small)
    writers write; all-reduce(MIN) "my part succeeded"; rank 0 commits (manifest, rename); barrier

Gathering a stage's tensors onto one writer costs that writer the memory of what it writes (all non-expert
weights on rank 0): right for the model sizes this package trains on a CPU, not for a 671B model — there, each
stage would write its own files (a format extension the readers do not have yet).

Loading needs no communication: every rank reads the files, keeps its own stages' tensors (cutting its EP slice
of the experts) and the AdamW state of its own parameters; ZeRO keeps its shard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from latentmoe import checkpoint as ckpt
from latentmoe.checkpoint.tensors import read_safetensors
from latentmoe.config import ModelConfig
from latentmoe.io import one_line
from latentmoe.model.moe import is_expert_parameter
from latentmoe.parallel.checkpoint import EP_STATE_KEY, collective_commit
from latentmoe.train.optim import split_decay_params

PIPELINE_STATE_KEY = "pipeline"


def global_parameter_order(config: ModelConfig) -> tuple[list[str], int]:
    """Parameter names in the single-process optimizer's index order (``build_optimizer``: the decay group, then
    the no-decay group) and the size of the decay group. Built on the meta device: no memory."""
    from latentmoe.model.transformer import CausalLM

    with torch.device("meta"):
        full = CausalLM(config)
    split = split_decay_params(full)
    return split.decay + split.no_decay, len(split.decay)


def _named_optimizer_state(optimizer, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    if hasattr(optimizer, "named_state"):
        return optimizer.named_state()  # collective under ZeRO
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: dict(s) for p, s in optimizer.state.items() if id(p) in names}


def _hyperparameters(optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings of the decay and the no-decay group (the single-process optimizer's two groups)."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    decay = max(groups, key=lambda g: g.get("weight_decay", 0.0))
    no_decay = min(groups, key=lambda g: g.get("weight_decay", 0.0))
    return decay, no_decay


def _full_state(named: dict[str, dict[str, torch.Tensor]], order: list[str], n_decay: int,
                hyper: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    """A torch optimizer state dict in the single-process index space, holding the entries of ``named``."""
    index = {n: i for i, n in enumerate(order)}
    state = {index[n]: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
             for n, s in named.items()}
    groups = [{**hyper[0], "params": list(range(n_decay))},
              {**hyper[1], "params": list(range(n_decay, len(order)))}]
    return {"state": state, "param_groups": groups}


def save_pipeline_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer,
    trainer_state: dict[str, Any],
    config: ModelConfig,
    *,
    strategy,
    keep_last: int | None = None,
    owner_kind: str = ckpt.RUN_KIND,
) -> Path:
    """Write ``out_dir/checkpoint-STEP`` from every rank (collective); returns its path on every rank."""
    topo = strategy.topology
    extra = {PIPELINE_STATE_KEY: {"pp_size": topo.pp_size, "schedule": strategy.pipeline.schedule,
                                  "layers_per_stage": strategy.counts}}
    if topo.ep_size > 1:
        extra[EP_STATE_KEY] = {"ep_size": topo.ep_size}
    return collective_commit(
        out_dir, step, lambda tmp: _write_parts(tmp, model, optimizer, config, strategy), trainer_state,
        rank=topo.rank, world=strategy.groups.world, keep_last=keep_last, owner_kind=owner_kind, extra_state=extra)


def _write_parts(tmp: Path, model: nn.Module, optimizer, config: ModelConfig, strategy) -> None:
    topo, groups = strategy.topology, strategy.groups
    rest, experts = ckpt.split_experts(ckpt.model_tensors(model))
    named = _named_optimizer_state(optimizer, model) if optimizer is not None else {}
    order, n_decay = global_parameter_order(config)
    hyper = _hyperparameters(optimizer) if optimizer is not None else ({}, {})
    dense_state = {n: s for n, s in named.items() if not is_expert_parameter(n)}
    expert_state = {n: s for n, s in named.items() if is_expert_parameter(n)}
    split_ep = topo.ep_size > 1

    # non-expert tensors (and, with EP 1, the experts) → rank 0, along the pipeline of stage-rank 0
    dense_part = None
    if topo.stage_rank == 0:
        payload = {"tensors": rest if split_ep else {**rest, **experts},
                   "state": dense_state if split_ep else named}
        dense_part = _gather_pipeline(payload, groups.pp, dst=topo.pp_group_ranks(0)[0])
    # expert slices → stage 0's rank of the same EP slice, along the pipeline of that stage rank
    expert_part = None
    if split_ep and topo.dp_rank == 0:
        expert_part = _gather_pipeline({"tensors": experts, "state": expert_state}, groups.pp,
                                       dst=topo.pp_group_ranks()[0])
    # the step counters of expert slices belong in optimizer.safetensors (rank 0) — small, over the world
    steps = {n: {k: v for k, v in s.items() if torch.is_tensor(v) and v.dim() == 0}
             for n, s in expert_state.items()} if split_ep and topo.dp_rank == 0 else {}
    all_steps = [None] * topo.world_size if topo.rank == 0 else None
    dist.gather_object(steps, all_steps, dst=0, group=groups.world)

    if optimizer is None:
        return
    if topo.rank == 0:
        tensors, state = _merge(dense_part)
        for part in all_steps:
            for n, s in part.items():
                state.setdefault(n, {}).update(s)
        full = _full_state(state, order, n_decay, hyper)
        opt_tensors, opt_meta = ckpt.flatten_optimizer_state(full)
        ckpt.write_main_files(tmp, tensors=tensors, config=config, optimizer_tensors=opt_tensors,
                              optimizer_metadata=opt_meta)
    if expert_part is not None and topo.pp_rank == 0:
        tensors, state = _merge(expert_part)
        full = _full_state(state, order, n_decay, hyper)
        opt_tensors, _ = ckpt.flatten_optimizer_state(full)
        moments = {k: t for k, t in opt_tensors.items() if t.dim() >= 1}  # the steps went to rank 0
        ckpt.write_expert_shard(tmp, rank=topo.ep_rank, size=topo.ep_size, tensors=tensors,
                                optimizer_tensors=moments)


def _gather_pipeline(payload: dict, group, *, dst: int) -> list[dict] | None:
    """``gather_object`` along a pipeline group (every stage's payload on ``dst``, a global rank)."""
    if group is None:
        return [payload]
    out = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
    dist.gather_object(payload, out, dst=dst, group=group)
    return out


def _merge(parts: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """One dict of tensors and one of optimizer state from every stage's part (a replicated embedding is the same
    tensor on two stages: the first copy is kept)."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for part in parts:
        for n, t in part["tensors"].items():
            tensors.setdefault(n, t)
        for n, s in part["state"].items():
            state.setdefault(n, s)
    return tensors, state


# --------------------------------------------------------------------------------------------- loading
def load_pipeline_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer=None,
    *,
    strategy,
    check_hashes: bool = True,
) -> dict[str, Any]:
    """Load any checkpoint (one process, EP, PP) into this rank's stages and optimizer; returns the trainer state."""
    path = Path(path)
    state = ckpt.verify_checkpoint(path, hashes=check_hashes,
                                   require=(ckpt.OPTIMIZER_FILE,) if optimizer is not None else ())
    ep_rank = strategy.topology.ep_rank
    _load_weights(path, model, ep_rank)
    if optimizer is not None:
        _load_optimizer(path, model, optimizer, ep_rank, model.config)
    state.pop(ckpt.MANIFEST_KEY)
    return state


def _load_weights(path: Path, model: nn.Module, ep_rank: int) -> None:
    model_path = path / ckpt.MODEL_FILE
    tensors = read_safetensors(model_path)
    tensors.update(ckpt.merged_expert_tensors(path, "model"))
    own = model.state_dict()
    mine = {}
    for name, t in own.items():
        if name not in tensors:
            raise ckpt.CheckpointError(f"{model_path}: no tensor {name} (does not fit the model)")
        saved = tensors[name]
        mine[name] = ckpt.local_slice(saved, t.shape[0], ep_rank) if is_expert_parameter(name) else saved
    try:
        model.load_state_dict(mine, strict=True)
    except RuntimeError as exc:
        raise ckpt.CheckpointError(f"{model_path}: does not fit the model ({one_line(exc)})") from None


def _load_optimizer(path: Path, model: nn.Module, optimizer, ep_rank: int, config: ModelConfig) -> None:
    from safetensors import safe_open

    opt_path = path / ckpt.OPTIMIZER_FILE
    try:
        with safe_open(str(opt_path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no iter
        tensors.update(ckpt.merged_expert_tensors(path, "optimizer"))
        full = ckpt.unflatten_optimizer_state(tensors, metadata)
    except (OSError, KeyError, ValueError) as exc:
        raise ckpt.CheckpointError(f"{opt_path}: cannot restore optimizer state ({one_line(exc)})") from None
    index = {n: i for i, n in enumerate(global_parameter_order(config)[0])}
    params = dict(model.named_parameters())
    named: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in params.items():
        saved = full["state"].get(index[name])
        if saved is None:
            continue
        named[name] = {k: ckpt.local_slice(v, p.shape[0], ep_rank)
                       if is_expert_parameter(name) and torch.is_tensor(v) and v.dim() >= 1 else v
                       for k, v in saved.items()}
    if hasattr(optimizer, "load_named_state"):
        optimizer.load_named_state(named)
        return
    local = optimizer.state_dict()
    order = [id(p) for g in optimizer.param_groups for p in g["params"]]
    by_id = {id(p): n for n, p in params.items()}
    state = {i: named[by_id[pid]] for i, pid in enumerate(order) if by_id.get(pid) in named}
    try:
        optimizer.load_state_dict({"state": state, "param_groups": local["param_groups"]})
    except (KeyError, ValueError) as exc:
        raise ckpt.CheckpointError(f"{opt_path}: cannot restore optimizer state ({one_line(exc)})") from None
