"""Writing and reading checkpoints: built in a temporary directory, committed with one rename, verified on load.

**Writing** is three steps, so that one process or many can take part (``latentmoe.parallel.checkpoint`` runs
the same steps with every rank writing its expert shard into the same temporary directory)::

    tmp = begin_checkpoint(out_dir, step)                 RUN/.latentmoe-tmp-checkpoint-STEP-XXXX/
    write_main_files(tmp, ...) / write_expert_shard(...)  safetensors + config.json
    commit_checkpoint(tmp, out_dir, step, state)          trainer_state.json with the manifest, fsync, rename

A process killed mid-save therefore leaves either the old set of checkpoints or the old set plus the new,
complete one — never a half-written ``checkpoint-STEP``; the temporary directory it leaves is ours by its prefix
and is removed at the next start. An existing checkpoint of the same step is replaced only when it is one of
ours and holds nothing else; a damaged one there is renamed aside (``checkpoint-STEP.damaged-N``), never deleted.

**Reading** checks every file's size and sha256 first, so a corrupted file ends in :class:`CheckpointError`
naming it instead of silently loading garbage weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from latentmoe.checkpoint.layout import (
    CONFIG_FILE,
    FORMAT_VERSION,
    MANIFEST_KEY,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    CheckpointError,
    checkpoint_name,
    describe_file,
    list_checkpoints,
    resolve_checkpoint,
    verify_checkpoint,
)
from latentmoe.checkpoint.tensors import (
    expert_shard_name,
    expert_state_indices,
    flatten_optimizer_state,
    is_expert_state,
    local_slice,
    merged_expert_tensors,
    model_tensors,
    read_model_tensors,
    shard_files,
    unflatten_optimizer_state,
    write_safetensors,
)
from latentmoe.config import ConfigError, ModelConfig
from latentmoe.io import (
    DestinationError,
    claim,
    disown,
    foreign_in_tree,
    one_line,
    read_ownership,
    remove_owned_tree,
    replace_owned_directory,
    temp_dir,
    write_json_atomic,
)
from latentmoe.model.moe import is_expert_parameter

RUN_KIND = "run"
SAFETENSORS_METADATA = {"format": "pt"}
DAMAGED_SUFFIX = "damaged"
TOKENIZER_FILE = "tokenizer.json"  # beside the checkpoints of a run (or inside a checkpoint directory)


# --------------------------------------------------------------------------------------------- writing


def begin_checkpoint(out_dir: str | os.PathLike, step: int) -> Path:
    """A new temporary directory in ``out_dir`` that will become ``checkpoint-STEP``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return temp_dir(out_dir, checkpoint_name(step))


def write_main_files(
    tmp: Path,
    *,
    tensors: dict[str, torch.Tensor],
    config: ModelConfig,
    optimizer_tensors: dict[str, torch.Tensor] | None = None,
    optimizer_metadata: dict[str, str] | None = None,
) -> None:
    """``model.safetensors``, ``config.json`` and (with optimizer tensors) ``optimizer.safetensors`` into ``tmp``."""
    write_safetensors(tensors, tmp / MODEL_FILE, metadata=SAFETENSORS_METADATA)
    config.to_json(tmp / CONFIG_FILE)
    if optimizer_tensors is not None:
        write_safetensors(optimizer_tensors, tmp / OPTIMIZER_FILE, metadata=optimizer_metadata or {})


def write_expert_shard(
    tmp: Path,
    *,
    rank: int,
    size: int,
    tensors: dict[str, torch.Tensor],
    optimizer_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """EP rank ``rank`` of ``size``'s expert slices (and their AdamW moments) into ``tmp``."""
    write_safetensors(tensors, tmp / expert_shard_name("model", rank, size), metadata=SAFETENSORS_METADATA)
    if optimizer_tensors is not None:
        write_safetensors(optimizer_tensors, tmp / expert_shard_name("optimizer", rank, size),
                          metadata=SAFETENSORS_METADATA)


def commit_checkpoint(
    tmp: Path,
    out_dir: str | os.PathLike,
    step: int,
    trainer_state: dict[str, Any],
    *,
    extra_state: dict[str, Any] | None = None,
    owner_kind: str = RUN_KIND,
) -> Path:
    """Write ``trainer_state.json`` (``step``, format version, manifest of every file in ``tmp``) and rename ``tmp``
    to ``out_dir/checkpoint-STEP``; record it in the run directory's marker. Returns the checkpoint path."""
    out_dir = Path(out_dir)
    final = out_dir / checkpoint_name(step)
    written = sorted(p.name for p in tmp.iterdir())
    state = dict(trainer_state)
    state["step"] = step
    state["format_version"] = FORMAT_VERSION
    state.update(extra_state or {})
    state[MANIFEST_KEY] = {name: describe_file(tmp / name) for name in written}
    write_json_atomic(tmp / STATE_FILE, state, sort_keys=True)
    if final.exists():
        _make_room(final)
    replace_owned_directory(tmp, final)
    claim(out_dir, owner_kind, [final.name])
    return final


def _make_room(final: Path) -> None:
    """An existing ``checkpoint-STEP`` that is ours and complete is replaced by the commit; a damaged one, or one
    holding files we did not write, is renamed aside so that nothing of it is lost."""
    try:
        verify_checkpoint(final, hashes=True)
        foreign = foreign_in_tree(final)
    except CheckpointError:
        foreign = None
    if foreign == []:
        return
    set_aside(final)


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint to ``NAME.damaged-N`` — never deleted: a person may want to look at it — so the
    run can write that step again; returns the new path."""
    n = 1
    while (aside := ckpt.with_name(f"{ckpt.name}.{DAMAGED_SUFFIX}-{n}")).exists():
        n += 1
    os.rename(ckpt, aside)
    owner = read_ownership(ckpt.parent)
    if owner is not None:
        claim(ckpt.parent, owner.kind, [aside.name])
    return aside


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    config: ModelConfig,
    *,
    keep_last: int | None = None,
    owner_kind: str = RUN_KIND,
) -> Path:
    """Write ``out_dir/checkpoint-STEP`` atomically from one process and return its path.

    ``trainer_state`` must be JSON-serialisable; ``step`` and the file manifest are added to it. An existing
    checkpoint of the same step is replaced (see :func:`commit_checkpoint`). With ``keep_last=K`` only the newest
    K complete checkpoints are kept afterwards."""
    tmp = begin_checkpoint(out_dir, step)
    try:
        opt_tensors, opt_meta = (None, None)
        if optimizer is not None:
            opt_tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
        write_main_files(tmp, tensors=model_tensors(model), config=config, optimizer_tensors=opt_tensors,
                         optimizer_metadata=opt_meta)
        final = commit_checkpoint(tmp, out_dir, step, trainer_state, owner_kind=owner_kind)
    except BaseException:
        _discard(tmp)
        raise
    if keep_last is not None:
        prune_checkpoints(out_dir, keep_last=keep_last)
    return final


def _discard(tmp: Path) -> None:
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)  # a temporary directory of ours: only our own files are in it


def prune_checkpoints(out_dir: str | os.PathLike, *, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (only files their manifests list); return the
    deleted paths. A checkpoint holding files we did not write keeps them (and its directory)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    out_dir = Path(out_dir)
    doomed = list_checkpoints(out_dir)[:-keep_last]
    removed = [path for path in doomed if remove_owned_tree(path)]
    disown(out_dir, [p.name for p in removed])
    return removed


# --------------------------------------------------------------------------------------------- reading


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    ep_rank: int = 0,
    check_hashes: bool = True,
) -> dict[str, Any]:
    """Load weights (and optimizer state) in place; return the trainer state (manifest removed).

    Works for plain and expert-parallel checkpoints alike: expert shards are merged and cut to ``model``'s own
    slice (``ep_rank`` of its EP group; 0 and full tensors for one process). Every file's size (and sha256, unless
    the caller verified it already) is checked first. Raises :class:`CheckpointError` naming the file when
    something is missing, corrupt, or does not fit ``model`` / ``optimizer``."""
    ckpt = Path(path)
    state = verify_checkpoint(ckpt, hashes=check_hashes, require=(OPTIMIZER_FILE,) if optimizer is not None else ())
    _load_model_weights(ckpt, model, ep_rank=ep_rank)
    if optimizer is not None:
        _load_optimizer(ckpt, model, optimizer, ep_rank=ep_rank)
    state.pop(MANIFEST_KEY)
    return state


def load_weights(
    path: str | os.PathLike, model: nn.Module, *, ep_rank: int = 0, check_hashes: bool = True
) -> Path:
    """The model weights of a checkpoint (or a run directory's newest) into ``model``, in place; nothing else is
    read (no optimizer state). Each routed-expert tensor is read only for the rows ``model`` holds (EP rank
    ``ep_rank``'s slice). Sizes (and sha256 unless ``check_hashes`` is False) are checked first. Returns the
    checkpoint directory; CheckpointError names a missing, corrupt or ill-fitting file."""
    ckpt = resolve_checkpoint(path)
    verify_checkpoint(ckpt, hashes=check_hashes)
    _load_model_weights(ckpt, model, ep_rank=ep_rank)
    return ckpt


def _load_model_weights(ckpt: Path, model: nn.Module, *, ep_rank: int) -> None:
    """The weights into ``model``; each routed-expert tensor only the rows this rank holds is read."""
    model_path = ckpt / MODEL_FILE
    own = model.state_dict()
    own_rows = {name: t.shape[0] for name, t in own.items() if is_expert_parameter(name)}
    tensors = read_model_tensors(model_path, shard_files(ckpt, "model"), own_rows, ep_rank=ep_rank)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{model_path}: does not fit the model ({one_line(exc)})") from None


def _load_optimizer(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, ep_rank: int) -> None:
    opt_path = ckpt / OPTIMIZER_FILE
    try:
        with safe_open(str(opt_path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no iter
        tensors.update(merged_expert_tensors(ckpt, "optimizer"))
        params = [p for g in optimizer.param_groups for p in g["params"]]
        expert_idx = expert_state_indices(model, optimizer)
        for key, t in list(tensors.items()):
            idx = int(key.split(".", 2)[1])
            if is_expert_state(key, t, expert_idx) and idx < len(params):
                tensors[key] = local_slice(t, params[idx].shape[0], ep_rank)
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, metadata))
    except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{opt_path}: cannot restore optimizer state ({one_line(exc)})") from None


def load_config(ckpt: Path) -> ModelConfig:
    try:
        return ModelConfig.from_json(ckpt / CONFIG_FILE, strict=False)
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: {one_line(exc)}") from None


def load_model(
    checkpoint_dir: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
):
    """``(CausalLM, ModelConfig)`` from a checkpoint (or a run directory: its newest checkpoint), in eval mode.

    The model is allocated once, directly on ``device`` (default the host), in ``dtype``; only ``config.json`` and
    the model files are read (the optimizer state is not touched)."""
    from latentmoe.model.transformer import empty_model

    ckpt = resolve_checkpoint(checkpoint_dir)
    verify_checkpoint(ckpt, hashes=True)
    config = load_config(ckpt)
    model = empty_model(config, dtype=dtype, device=device)
    _load_model_weights(ckpt, model, ep_rank=0)
    return model.eval(), config


def find_tokenizer(ckpt: str | os.PathLike, *, required: bool = True):
    """The ``tokenizers.Tokenizer`` of ``tokenizer.json`` inside a checkpoint directory or in its run directory
    (None when absent and not ``required``); CheckpointError naming the file when it is not a valid tokenizer."""
    from tokenizers import Tokenizer

    ckpt = Path(ckpt)
    for candidate in (ckpt / TOKENIZER_FILE, ckpt.parent / TOKENIZER_FILE):
        if candidate.is_file():
            try:
                return Tokenizer.from_file(str(candidate))
            except Exception as exc:  # tokenizers raises a bare Exception on a bad file
                raise CheckpointError(f"{candidate}: not a valid tokenizer ({one_line(exc)})") from None
    if required:
        raise CheckpointError(f"no {TOKENIZER_FILE} in {ckpt} or {ckpt.parent}")
    return None


__all__ = [
    "DestinationError",
    "begin_checkpoint",
    "commit_checkpoint",
    "find_tokenizer",
    "load_checkpoint",
    "load_config",
    "load_model",
    "load_weights",
    "prune_checkpoints",
    "save_checkpoint",
    "set_aside",
    "write_expert_shard",
    "write_main_files",
]
