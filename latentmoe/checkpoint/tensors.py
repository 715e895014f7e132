"""Tensors in checkpoint files: the model state, the flattened optimizer state, and routed-expert shards.

**Optimizer state.** ``optimizer.state_dict()`` is a nest of dicts; safetensors holds flat named tensors. Tensor
entries become ``state.{param_index}.{key}``; scalars and the ``param_groups`` hyper-parameters go to the file's
JSON metadata. :func:`unflatten_optimizer_state` inverts it exactly.

**Expert shards.** In an expert-parallel run each EP rank holds a contiguous slice ``[E/P, ...]`` of every
stacked expert tensor. Its file ``model-experts-RRRRR-of-PPPPP.safetensors`` stores that slice under the full
name (and ``optimizer-experts-...`` the AdamW moments of those slices). Loading concatenates the shards in rank
order into full ``[E, ...]`` tensors (:func:`merged_expert_tensors`) and cuts the loading model's slice
(:func:`local_slice`): one process takes them whole, an EP run of any size its own rows. Nothing here talks to
other processes; ``latentmoe.parallel.checkpoint`` adds the collective steps.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from latentmoe.checkpoint.layout import FORMAT_VERSION, CheckpointError
from latentmoe.io import one_line
from latentmoe.model.moe import is_expert_parameter

EXPERT_SHARD = "{kind}-experts-{rank:05d}-of-{size:05d}.safetensors"
SHARD_KINDS = ("model", "optimizer")
_SHARD_RE = re.compile(r"^(model|optimizer)-experts-(\d{5})-of-(\d{5})\.safetensors$")


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, *, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.save_file``, with its I/O failures (a full disk, a read-only filesystem) raised as one
    ``OSError`` naming the file — safetensors reports them as its own exception type."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        raise OSError(f"{path}: cannot write ({one_line(exc)})") from None


def first_nonfinite(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN or inf (None when every value is finite)."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all()):
            return name
    return None


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as contiguous CPU tensors, with tied/shared tensors cloned.

    safetensors refuses tensors that share storage (e.g. tied embedding and output weights); a clone stores the
    same values under both names, and loading writes them back to both."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            tensor = tensor.clone()
        seen.add(ptr)
        tensors[name] = tensor.contiguous().cpu()
    return tensors


def _jsonable(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``optimizer.state_dict()`` → (flat tensors ``state.{idx}.{key}``, metadata of JSON strings)."""
    tensors: dict[str, torch.Tensor] = {}
    non_tensor: dict[str, dict[str, Any]] = {}
    for idx, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                non_tensor.setdefault(str(idx), {})[key] = _jsonable(value)
    metadata = {
        "format": "latentmoe-optimizer",
        "format_version": str(FORMAT_VERSION),
        "param_groups": json.dumps(_jsonable(state_dict["param_groups"])),
        "non_tensor_state": json.dumps(non_tensor),
    }
    return tensors, metadata


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = tensor
    for idx, values in json.loads(metadata.get("non_tensor_state", "{}")).items():
        state.setdefault(int(idx), {}).update(values)
    groups = json.loads(metadata["param_groups"])
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def optimizer_state_index(key: str) -> int:
    """The parameter index of a flattened optimizer key ``state.{idx}.{name}``."""
    return int(key.split(".", 2)[1])


def expert_state_indices(model: nn.Module, optimizer: torch.optim.Optimizer) -> set[int]:
    """Optimizer state indices (parameter order over its groups) that belong to routed-expert tensors."""
    names = {id(p): n for n, p in model.named_parameters()}
    indices, i = set(), 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if is_expert_parameter(names.get(id(p), "")):
                indices.add(i)
            i += 1
    return indices


def is_expert_state(key: str, tensor: torch.Tensor, expert_indices: set[int]) -> bool:
    """Whether a flattened optimizer entry is a per-expert tensor (a moment of an expert slice, not its step)."""
    return optimizer_state_index(key) in expert_indices and tensor.dim() >= 1


def split_experts(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(everything else, routed experts)`` of a model state dict."""
    experts = {n: t for n, t in tensors.items() if is_expert_parameter(n)}
    return {n: t for n, t in tensors.items() if n not in experts}, experts


def expert_shard_name(kind: str, rank: int, size: int) -> str:
    if kind not in SHARD_KINDS:
        raise ValueError(f"kind must be one of {SHARD_KINDS}, got {kind!r}")
    return EXPERT_SHARD.format(kind=kind, rank=rank, size=size)


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
        raise CheckpointError(f"{ckpt}: expert shards {missing} of {size} are missing ({kind})")
    return [found[r] for r in range(size)]


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; CheckpointError naming it when unreadable."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors ({one_line(exc)})") from None


def merged_expert_tensors(ckpt: Path, kind: str) -> dict[str, torch.Tensor]:
    """Full ``[E, ...]`` expert tensors assembled from the shards (concatenated in EP-rank order); {} when none."""
    parts: dict[str, list[torch.Tensor]] = {}
    for path in shard_files(ckpt, kind):
        for name, t in read_safetensors(path).items():
            parts.setdefault(name, []).append(t)
    return {name: torch.cat(ts) for name, ts in parts.items()}


def local_slice(full: torch.Tensor, local_rows: int, ep_rank: int) -> torch.Tensor:
    """EP rank ``ep_rank``'s contiguous ``local_rows`` experts of a full ``[E, ...]`` tensor."""
    if full.shape[0] == local_rows:
        return full
    if local_rows < 1 or full.shape[0] % local_rows:
        raise CheckpointError(f"{full.shape[0]} experts do not split into slices of {local_rows}")
    return full[ep_rank * local_rows : (ep_rank + 1) * local_rows]


def local_rows(full_rows: int, local: int, ep_rank: int) -> tuple[int, int]:
    """``[start, stop)``: the rows of a full ``[E, ...]`` expert tensor that EP rank ``ep_rank`` holds when it
    holds ``local`` of them (all of them when ``local == full_rows``) — the slice :func:`local_slice` cuts."""
    if local == full_rows:
        return 0, full_rows
    if local < 1 or full_rows % local or (ep_rank + 1) * local > full_rows:
        raise CheckpointError(f"{full_rows} experts do not split into slices of {local} (EP rank {ep_rank})")
    return ep_rank * local, (ep_rank + 1) * local


def read_model_tensors(
    model_file: Path, shards: list[Path], own_rows: dict[str, int], *, ep_rank: int
) -> dict[str, torch.Tensor]:
    """A checkpoint's model tensors for a model holding ``own_rows[name]`` rows of each routed-expert tensor:
    every other tensor whole, each expert tensor only this EP rank's rows, read row range by row range
    (safetensors slices) from ``model_file`` (stacked ``[E, ...]`` tensors) and from the expert ``shards``
    (``model-experts-R-of-P``, in rank order, each ``[E/P, ...]``) — a rank never reads another rank's experts.
    CheckpointError names an unreadable file."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(model_file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if is_expert_parameter(key) and key in own_rows:
                    part = f.get_slice(key)
                    start, stop = local_rows(part.get_shape()[0], own_rows[key], ep_rank)
                    tensors[key] = part[start:stop]
                else:
                    tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{model_file}: unreadable safetensors ({one_line(exc)})") from None
    if shards:
        tensors.update(_read_shard_rows(shards, own_rows, ep_rank=ep_rank))
    return tensors


def _read_shard_rows(shards: list[Path], own_rows: dict[str, int], *, ep_rank: int) -> dict[str, torch.Tensor]:
    """This rank's rows of every expert tensor split over ``shards`` (concatenated in rank order)."""
    firsts: dict[tuple[str, int], int] = {}  # (key, shard) -> the first row of that shard's part
    totals: dict[str, int] = {}
    pieces: dict[str, list[torch.Tensor]] = {}
    path = shards[0]
    try:
        for i, path in enumerate(shards):  # headers only: where each shard's rows sit in the full tensors
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    firsts[key, i] = totals.get(key, 0)
                    totals[key] = totals.get(key, 0) + f.get_slice(key).get_shape()[0]
        for i, path in enumerate(shards):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118
                    part = f.get_slice(key)
                    first, rows = firsts[key, i], part.get_shape()[0]
                    start, stop = local_rows(totals[key], own_rows.get(key, totals[key]), ep_rank)
                    a, b = max(start, first), min(stop, first + rows)
                    if a < b:
                        pieces.setdefault(key, []).append(part[a - first : b - first])
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors ({one_line(exc)})") from None
    return {key: torch.cat(ts) for key, ts in pieces.items()}
