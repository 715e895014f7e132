"""The on-disk layout of a checkpoint: file names, the manifest, and finding the newest complete one.

A checkpoint is a directory ``RUN/checkpoint-STEP`` (STEP zero-padded to six digits, so names sort like steps)::

    model.safetensors        model.state_dict(): parameters *and* persistent buffers (router biases); in an
                             expert-parallel checkpoint everything but the routed experts
    config.json              the ModelConfig, Hugging Face field names
    optimizer.safetensors    AdamW state flattened to ``state.{param_index}.{key}``; param_groups as JSON metadata
    model-experts-RRRRR-of-PPPPP.safetensors, optimizer-experts-...  (expert parallelism only: EP rank R's slice)
    trainer_state.json       step, RNG state, data position, counters + the manifest: size and sha256 of every
                             other file (``checkpoint_files``)

The manifest is what makes a checkpoint ours and complete: a directory whose manifest is missing, or one of whose
listed files is missing or of the wrong size, is incomplete; a listed file whose sha256 differs is corrupt.
Nothing is ever unpickled: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
MANIFEST_KEY = "checkpoint_files"
FORMAT_VERSION = 1
CHECKPOINT_PREFIX = "checkpoint-"
STEP_DIGITS = 6
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model; the message names the file."""


def checkpoint_name(step: int) -> str:
    """``checkpoint-000123``: zero-padded so lexical and numeric order agree for steps < 10**6."""
    return f"{CHECKPOINT_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_checkpoint_name(name: str) -> int | None:
    """The step of a ``checkpoint-STEP`` name, or None for any other name."""
    match = _CHECKPOINT_RE.match(name)
    return int(match.group(1)) if match else None


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step encoded in a checkpoint directory's name."""
    step = parse_checkpoint_name(Path(path).name)
    if step is None:
        raise CheckpointError(f"{path}: not a checkpoint directory name (expected {CHECKPOINT_PREFIX}STEP)")
    return step


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def describe_file(path: Path) -> dict[str, Any]:
    """A manifest entry: ``{"bytes": size, "sha256": hex}``."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def read_state(ckpt: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint (manifest included); CheckpointError naming the file otherwise."""
    path = ckpt / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (incomplete checkpoint)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({_reason(exc)})") from None
    if not isinstance(state, dict) or not isinstance(state.get(MANIFEST_KEY), dict):
        raise CheckpointError(f"{path}: no file manifest (not a latentmoe checkpoint, or incomplete)")
    return state


def check_files(ckpt: Path, state: dict[str, Any], *, hashes: bool) -> None:
    """Every manifest file present at its recorded size (and sha256 when ``hashes``); model + config listed."""
    for name, expected in state[MANIFEST_KEY].items():
        path = ckpt / name
        if not isinstance(expected, dict):
            raise CheckpointError(f"{ckpt / STATE_FILE}: manifest entry for {name} is not an object")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (incomplete checkpoint)")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise CheckpointError(f"{path}: {size} bytes, expected {expected.get('bytes')} (truncated or corrupt)")
        if hashes and sha256_file(path) != expected.get("sha256"):
            raise CheckpointError(f"{path}: sha256 mismatch (file corrupt or modified)")
    for name in (MODEL_FILE, CONFIG_FILE):
        if name not in state[MANIFEST_KEY]:
            raise CheckpointError(f"{ckpt / name}: not in the manifest of {ckpt / STATE_FILE}")


def verify_checkpoint(
    ckpt: str | os.PathLike,
    *,
    hashes: bool = True,
    require: tuple[str, ...] = (),
    require_state_keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Check a checkpoint directory as a loader would, without loading tensors; return its state (with manifest).

    hashes: also compare every file's sha256. require: files that must be in the manifest (e.g. the optimizer
    for a resume). require_state_keys: keys ``trainer_state.json`` must hold. The step in the state must match
    the directory name, and ``config.json`` must parse as a model config."""
    from latentmoe.config import ConfigError, ModelConfig

    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    state = read_state(ckpt)
    check_files(ckpt, state, hashes=hashes)
    for name in require:
        if name not in state[MANIFEST_KEY]:
            raise CheckpointError(f"{ckpt / name}: missing (checkpoint saved without it)")
    for key in ("step", *require_state_keys):
        if key not in state:
            raise CheckpointError(f"{ckpt / STATE_FILE}: no {key!r} (damaged trainer state)")
    step = parse_checkpoint_name(ckpt.name)
    if step is not None and state["step"] != step:
        raise CheckpointError(f"{ckpt / STATE_FILE}: step {state['step']!r} does not match the directory name")
    try:
        ModelConfig.from_json(ckpt / CONFIG_FILE, strict=False)
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: {_reason(exc)}") from None
    return state


def is_complete(ckpt: str | os.PathLike) -> bool:
    """Whether a checkpoint directory has its manifest and every listed file at the recorded size."""
    ckpt = Path(ckpt)
    try:
        check_files(ckpt, read_state(ckpt), hashes=False)
    except CheckpointError:
        return False
    return True


def checkpoint_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoint-STEP`` directory in ``out_dir``, complete or not, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(step, p) for p in out_dir.iterdir() if (step := parse_checkpoint_name(p.name)) is not None and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first (temporary and incomplete ones skipped)."""
    return [p for p in checkpoint_dirs(out_dir) if is_complete(p)]


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``out_dir``, or None."""
    checkpoints = list_checkpoints(out_dir)
    return checkpoints[-1] if checkpoints else None


@dataclass(frozen=True)
class Skipped:
    """A checkpoint passed over while looking for one to resume from, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Resumable:
    """What :func:`find_resumable` found: the newest checkpoint that verifies (None: none does) and every newer
    ``checkpoint-STEP`` directory it skipped, newest first, each with its reason."""

    checkpoint: Path | None
    skipped: tuple[Skipped, ...] = ()
    state: dict[str, Any] | None = None


def find_resumable(
    out_dir: str | os.PathLike, *, require: tuple[str, ...] = (), require_state_keys: tuple[str, ...] = ()
) -> Resumable:
    """The newest checkpoint in ``out_dir`` that fully verifies (sizes, sha256, state, config), newest first;
    the ones that do not are returned with their reasons instead of being passed over silently."""
    skipped: list[Skipped] = []
    for ckpt in reversed(checkpoint_dirs(out_dir)):
        try:
            state = verify_checkpoint(ckpt, hashes=True, require=require, require_state_keys=require_state_keys)
        except CheckpointError as exc:
            skipped.append(Skipped(ckpt, str(exc)))
            continue
        return Resumable(ckpt, tuple(skipped), state)
    return Resumable(None, tuple(skipped))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or the newest complete checkpoint inside a run directory."""
    path = Path(path)
    if (path / STATE_FILE).exists() or (path / MODEL_FILE).exists():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: no complete checkpoint found")
    return latest


def _reason(exc: BaseException) -> str:
    from latentmoe.io import one_line

    return one_line(exc)
