"""Checkpoints: safetensors + JSON, written to a temporary directory and renamed into place.

A checkpoint is a directory ``OUT/checkpoint-STEP`` (STEP zero-padded to six digits, so names sort
like steps) holding::

    model.safetensors      model.state_dict(): parameters *and* persistent buffers (router biases)
    config.json            the ModelConfig, Hugging Face field names
    optimizer.safetensors  AdamW state, flattened to ``state.{param_index}.{exp_avg|exp_avg_sq|step}``;
                           the param_groups hyper-parameters are JSON in the file's metadata header
    trainer_state.json     step, RNG state, data position, counters (whatever the trainer passes)
                           + a manifest: size and sha256 of every other file

Nothing is ever unpickled: tensors come from safetensors, everything else from JSON, so loading a
checkpoint cannot execute code.

**Crash safety.** All files are written into ``OUT/.checkpoint-STEP.tmp-XXXX`` and fsynced; only
then is that directory renamed to ``checkpoint-STEP`` (a rename within one filesystem is atomic).
A process killed mid-save therefore leaves either the old set of checkpoints or the old set plus
the new, complete one — never a half-written ``checkpoint-STEP``. Readers ignore the ``.tmp``
directories, and they also ignore any ``checkpoint-STEP`` whose manifest is missing or whose files
are missing or of the wrong size (a directory someone copied half of). Loading additionally checks
every file's sha256, so a corrupted file ends in :class:`CheckpointError` naming that file instead of
silently loading garbage weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from latentmoe.config import ConfigError, ModelConfig

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
MANIFEST_KEY = "checkpoint_files"
FORMAT_VERSION = 1
FILE_MODE = 0o644
DIR_MODE = 0o755
CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model; the message names the file."""


def checkpoint_name(step: int) -> str:
    """``checkpoint-000123``: zero-padded so lexical and numeric order agree for steps < 10**6."""
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step encoded in a checkpoint directory's name."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path}: not a checkpoint directory name (expected {CHECKPOINT_PREFIX}STEP)")
    return int(match.group(1))


# --------------------------------------------------------------------------------------------- saving


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    config: ModelConfig,
    *,
    keep_last: int | None = None,
) -> Path:
    """Write ``out_dir/checkpoint-STEP`` atomically and return its path.

    ``trainer_state`` must be JSON-serialisable; ``step`` and the file manifest are added to it.
    An existing checkpoint of the same step is replaced. With ``keep_last=K`` only the newest K
    complete checkpoints are kept afterwards.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=out_dir))
    try:
        save_file(_model_tensors(model), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        config.to_json(tmp / CONFIG_FILE)
        written = [MODEL_FILE, CONFIG_FILE]
        if optimizer is not None:
            tensors, metadata = _flatten_optimizer_state(optimizer.state_dict())
            save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata=metadata)
            written.append(OPTIMIZER_FILE)
        state = dict(trainer_state)
        state["step"] = step
        state["format_version"] = FORMAT_VERSION
        state[MANIFEST_KEY] = {name: _describe_file(tmp / name) for name in written}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        for name in [*written, STATE_FILE]:
            os.chmod(tmp / name, FILE_MODE)
            _fsync_file(tmp / name)
        os.chmod(tmp, DIR_MODE)  # mkdtemp makes it private (0700)
        if final.exists():
            # Move the old one aside first: rename() cannot replace a non-empty directory.
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=out_dir))
            os.replace(final, old / final.name)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        prune_checkpoints(out_dir, keep_last=keep_last)
    return final


def prune_checkpoints(out_dir: str | os.PathLike, *, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; return the deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    doomed = list_checkpoints(out_dir)[:-keep_last]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as contiguous CPU tensors, with tied/shared tensors cloned.

    safetensors refuses tensors that share storage (e.g. tied embedding and output weights); a
    clone stores the same values under both names, and loading writes them back to both.
    """
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


def _flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
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


def _describe_file(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------------------- finding


def _read_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (incomplete checkpoint)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({_one_line(exc)})") from None
    if not isinstance(state, dict) or not isinstance(state.get(MANIFEST_KEY), dict):
        raise CheckpointError(f"{path}: no file manifest (not a latentmoe checkpoint or incomplete)")
    return state


def _check_files(ckpt: Path, state: dict[str, Any], *, hashes: bool) -> None:
    for name, expected in state[MANIFEST_KEY].items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (incomplete checkpoint)")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise CheckpointError(f"{path}: {size} bytes, expected {expected.get('bytes')} (truncated or corrupt)")
        if hashes and _sha256(path) != expected.get("sha256"):
            raise CheckpointError(f"{path}: sha256 mismatch (file corrupt or modified)")
    for name in (MODEL_FILE, CONFIG_FILE):
        if name not in state[MANIFEST_KEY]:
            raise CheckpointError(f"{ckpt / name}: not in the manifest of {ckpt / STATE_FILE}")


def is_complete(ckpt: str | os.PathLike) -> bool:
    """Whether a checkpoint directory has its manifest and every listed file at the recorded size."""
    ckpt = Path(ckpt)
    try:
        _check_files(ckpt, _read_state(ckpt), hashes=False)
    except CheckpointError:
        return False
    return True


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first (temporary and incomplete ones skipped)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for path in out_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``out_dir``, or None."""
    checkpoints = list_checkpoints(out_dir)
    return checkpoints[-1] if checkpoints else None


# -------------------------------------------------------------------------------------------- loading


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load weights (and optimizer state) in place; return the trainer state (manifest removed).

    Every file's size and sha256 is checked first. Raises :class:`CheckpointError` naming the file
    when something is missing, corrupt, or does not fit ``model`` / ``optimizer``.
    """
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    state = _read_state(ckpt)
    _check_files(ckpt, state, hashes=True)
    _load_model_weights(ckpt / MODEL_FILE, model)
    if optimizer is not None:
        opt_path = ckpt / OPTIMIZER_FILE
        if OPTIMIZER_FILE not in state[MANIFEST_KEY]:
            raise CheckpointError(f"{opt_path}: missing (checkpoint saved without optimizer state)")
        try:
            with safe_open(str(opt_path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no iter
            tensors.update(_expert_shards(ckpt, "optimizer"))
            optimizer.load_state_dict(_unflatten_optimizer_state(tensors, metadata))
        except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{opt_path}: cannot restore optimizer state ({_one_line(exc)})") from None
    state.pop(MANIFEST_KEY)
    return state


def _load_model_weights(path: Path, model: nn.Module) -> None:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors ({_one_line(exc)})") from None
    tensors.update(_expert_shards(path.parent, "model"))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not fit the model ({_one_line(exc)})") from None


def _expert_shards(ckpt: Path, kind: str) -> dict[str, torch.Tensor]:
    """Routed experts of an expert-parallel checkpoint, reassembled from the per-rank shard files into full
    ``[E, ...]`` tensors ({} for a single-process checkpoint); see latentmoe.parallel.checkpoint."""
    from latentmoe.parallel.checkpoint import merged_expert_tensors

    return merged_expert_tensors(ckpt, kind)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or the newest complete checkpoint inside a training run's directory."""
    path = Path(path)
    if (path / STATE_FILE).exists() or (path / MODEL_FILE).exists():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: no complete checkpoint found")
    return latest


def load_model(checkpoint_dir: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """``(CausalLM, ModelConfig)`` from a checkpoint (or a run directory: its newest checkpoint), in eval mode.

    Reads ``config.json`` and ``model.safetensors`` only; the optimizer state is not touched.
    """
    from latentmoe import CausalLM

    ckpt = resolve_checkpoint(checkpoint_dir)
    state = _read_state(ckpt)
    _check_files(ckpt, state, hashes=True)
    try:
        config = ModelConfig.from_json(ckpt / CONFIG_FILE)
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: {_one_line(exc)}") from None
    model = CausalLM(config)
    _load_model_weights(ckpt / MODEL_FILE, model)
    return model.to(device).eval(), config


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."
