"""Checkpoints of an expert-parallel run: each EP rank writes its own experts; any layout can load them.

The directory is the ordinary ``checkpoint-STEP`` (``latentmoe.train.checkpoint``), written to a temporary
directory and renamed by rank 0 once every rank has written its files, with two kinds of extra files::

    model.safetensors                          everything but the routed experts (rank 0)
    optimizer.safetensors                      AdamW state of those, plus every parameter's step (rank 0)
    model-experts-00001-of-00004.safetensors   EP rank 1's experts, full names, local slice [E/P, ...]
    optimizer-experts-00001-of-00004.safetensors  AdamW moments of those slices
    config.json, trainer_state.json            (rank 0; the manifest lists and hashes every file)

Only the first EP group (DP rank 0) writes expert shards; the other groups hold identical copies.

**Loading reshards by expert index.** The shards are concatenated in EP-rank order into full ``[E, ...]``
tensors, then cut to the loading model's layout: a single process takes them whole (so
``latentmoe generate`` and ``load_model`` read an EP checkpoint unchanged), an EP run of any size takes its
contiguous slice. Resuming with the same world size restores every rank's tensors exactly (bit-exact).
The files are plain safetensors + JSON; nothing is unpickled. A shared filesystem is assumed (every rank
writes into the same temporary directory), as on a cluster with a shared home or NFS.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from latentmoe.config import ModelConfig
from latentmoe.parallel.ep import ExpertParallel, is_expert_parameter, moe_layers
from latentmoe.parallel.topology import ProcessGroups
from latentmoe.train import checkpoint as ck

EXPERT_MODEL_SHARD = "model-experts-{rank:05d}-of-{size:05d}.safetensors"
EXPERT_OPTIMIZER_SHARD = "optimizer-experts-{rank:05d}-of-{size:05d}.safetensors"
_SHARD_RE = re.compile(r"^(model|optimizer)-experts-(\d{5})-of-(\d{5})\.safetensors$")
EP_STATE_KEY = "expert_parallel"


# --------------------------------------------------------------------------------------------- layout


def _expert_param_indices(model: nn.Module, optimizer: torch.optim.Optimizer) -> set[int]:
    """Optimizer state indices (param order of its groups) that belong to routed-expert tensors."""
    names = {id(p): n for n, p in model.named_parameters()}
    indices, i = set(), 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if is_expert_parameter(names.get(id(p), "")):
                indices.add(i)
            i += 1
    return indices


def _is_expert_state_key(key: str, expert_idx: set[int], tensor: torch.Tensor) -> bool:
    _, idx, _ = key.split(".", 2)
    return int(idx) in expert_idx and tensor.dim() >= 1


def shard_files(ckpt: Path, kind: str) -> list[Path]:
    """The expert shard files of ``kind`` ("model" or "optimizer") in EP-rank order; [] for a plain checkpoint."""
    found: dict[int, Path] = {}
    size = None
    for path in ckpt.iterdir():
        m = _SHARD_RE.match(path.name)
        if m and m.group(1) == kind:
            found[int(m.group(2))] = path
            size = int(m.group(3))
    if not found:
        return []
    if sorted(found) != list(range(size)):
        missing = sorted(set(range(size)) - set(found))
        raise ck.CheckpointError(f"{ckpt}: expert shards {missing} of {size} are missing ({kind})")
    return [found[r] for r in range(size)]


def merged_expert_tensors(ckpt: Path, kind: str) -> dict[str, torch.Tensor]:
    """Full ``[E, ...]`` expert tensors assembled from the shards (concatenated in EP-rank order)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for path in shard_files(ckpt, kind):
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ck.CheckpointError(f"{path}: unreadable safetensors ({ck._one_line(exc)})") from None
        for name, t in tensors.items():
            parts.setdefault(name, []).append(t)
    return {name: torch.cat(ts) for name, ts in parts.items()}


def _local_slice(full: torch.Tensor, local_rows: int, ep_rank: int) -> torch.Tensor:
    if full.shape[0] == local_rows:
        return full
    if full.shape[0] % local_rows:
        raise ck.CheckpointError(f"{full.shape[0]} experts do not split into slices of {local_rows}")
    return full[ep_rank * local_rows : (ep_rank + 1) * local_rows]


def _ep_rank_of(model: nn.Module) -> int:
    for moe in moe_layers(model):
        hook = moe.expert_parallel
        if isinstance(hook, ExpertParallel):
            if not hook.placement.is_contiguous:
                raise ck.CheckpointError("checkpoints load into the contiguous expert placement (undo EPLB first)")
            return hook.ep_rank
    return 0


# --------------------------------------------------------------------------------------------- saving


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
) -> Path:
    """Write ``out_dir/checkpoint-STEP`` from every rank (collective); returns its path on every rank."""
    topo = groups.topology
    out_dir = Path(out_dir)
    final = out_dir / ck.checkpoint_name(step)
    box: list[Any] = [None]
    if topo.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        box[0] = tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=out_dir)
    dist.broadcast_object_list(box, src=0, group=groups.world)
    tmp = Path(box[0])
    ok = torch.ones(1)
    try:
        _write_rank_files(tmp, model, optimizer, topo, config)
    except BaseException:
        ok.zero_()
        raise
    finally:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=groups.world)  # doubles as the barrier
    if not bool(ok):
        if topo.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ck.CheckpointError(f"{final}: another rank failed to write its part of the checkpoint")
    if topo.rank == 0:
        try:
            _finalize(tmp, final, out_dir, step, trainer_state, topo.ep_size)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if keep_last is not None:
            ck.prune_checkpoints(out_dir, keep_last=keep_last)
    dist.barrier(group=groups.world)
    return final


def _write_rank_files(tmp: Path, model, optimizer, topo, config: ModelConfig) -> None:
    tensors = ck._model_tensors(model)
    experts = {n: t for n, t in tensors.items() if is_expert_parameter(n)}
    shard = {"rank": topo.ep_rank, "size": topo.ep_size}
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_meta: dict[str, str] = {}
    expert_idx: set[int] = set()
    if optimizer is not None:
        opt_tensors, opt_meta = ck._flatten_optimizer_state(optimizer.state_dict())
        expert_idx = _expert_param_indices(model, optimizer)
    if topo.dp_rank == 0:
        save_file(experts, str(tmp / EXPERT_MODEL_SHARD.format(**shard)), metadata={"format": "pt"})
        if optimizer is not None:
            mine = {k: t for k, t in opt_tensors.items() if _is_expert_state_key(k, expert_idx, t)}
            save_file(mine, str(tmp / EXPERT_OPTIMIZER_SHARD.format(**shard)), metadata={"format": "pt"})
    if topo.rank == 0:
        rest = {n: t for n, t in tensors.items() if n not in experts}
        save_file(rest, str(tmp / ck.MODEL_FILE), metadata={"format": "pt"})
        config.to_json(tmp / ck.CONFIG_FILE)
        if optimizer is not None:
            rest_opt = {k: t for k, t in opt_tensors.items() if not _is_expert_state_key(k, expert_idx, t)}
            save_file(rest_opt, str(tmp / ck.OPTIMIZER_FILE), metadata=opt_meta)


def _finalize(tmp: Path, final: Path, out_dir: Path, step: int, trainer_state: dict[str, Any], ep_size: int) -> None:
    written = sorted(p.name for p in tmp.iterdir())
    state = dict(trainer_state)
    state["step"] = step
    state["format_version"] = ck.FORMAT_VERSION
    state[EP_STATE_KEY] = {"ep_size": ep_size}
    state[ck.MANIFEST_KEY] = {name: ck._describe_file(tmp / name) for name in written}
    (tmp / ck.STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    for name in [*written, ck.STATE_FILE]:
        os.chmod(tmp / name, ck.FILE_MODE)
        ck._fsync_file(tmp / name)
    os.chmod(tmp, ck.DIR_MODE)
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=out_dir))
        os.replace(final, old / final.name)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    ck._fsync_dir(out_dir)


# --------------------------------------------------------------------------------------------- loading


def load_sharded_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    groups: ProcessGroups | None = None,
) -> dict[str, Any]:
    """Load any checkpoint (sharded or not) into ``model`` (full or EP-sharded) and ``optimizer``; returns the
    trainer state. Every file's sha256 is checked first."""
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise ck.CheckpointError(f"{ckpt}: no such checkpoint directory")
    state = ck._read_state(ckpt)
    ck._check_files(ckpt, state, hashes=True)
    ep_rank = _ep_rank_of(model)
    model_path = ckpt / ck.MODEL_FILE
    try:
        tensors = load_file(str(model_path))
    except (SafetensorError, OSError) as exc:
        raise ck.CheckpointError(f"{model_path}: unreadable safetensors ({ck._one_line(exc)})") from None
    tensors.update(merged_expert_tensors(ckpt, "model"))
    own = model.state_dict()
    for name, t in list(tensors.items()):
        if is_expert_parameter(name) and name in own:
            tensors[name] = _local_slice(t, own[name].shape[0], ep_rank)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ck.CheckpointError(f"{model_path}: does not fit the model ({ck._one_line(exc)})") from None
    if optimizer is not None:
        _load_optimizer(ckpt, state, model, optimizer, ep_rank)
    state.pop(ck.MANIFEST_KEY)
    return state


def _load_optimizer(ckpt: Path, state: dict, model, optimizer, ep_rank: int) -> None:
    opt_path = ckpt / ck.OPTIMIZER_FILE
    if ck.OPTIMIZER_FILE not in state[ck.MANIFEST_KEY]:
        raise ck.CheckpointError(f"{opt_path}: missing (checkpoint saved without optimizer state)")
    try:
        with safe_open(str(opt_path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no iter
        tensors.update(merged_expert_tensors(ckpt, "optimizer"))
        params = [p for g in optimizer.param_groups for p in g["params"]]
        expert_idx = _expert_param_indices(model, optimizer)
        for key, t in list(tensors.items()):
            idx = int(key.split(".", 2)[1])
            if _is_expert_state_key(key, expert_idx, t) and idx < len(params):
                tensors[key] = _local_slice(t, params[idx].shape[0], ep_rank)
        optimizer.load_state_dict(ck._unflatten_optimizer_state(tensors, metadata))
    except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
        raise ck.CheckpointError(f"{opt_path}: cannot restore optimizer state ({ck._one_line(exc)})") from None
