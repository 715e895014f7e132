"""``latentmoe convert``: Hugging Face layout ⇄ our training checkpoints (and HF → HF, e.g. FP8 → BF16), and
either of them → one GGUF file for llama.cpp (``to="gguf"``, see gguf_export.py).

Our checkpoints are run directories (``checkpoint-STEP/`` + ``tokenizer.json``, see latentmoe.checkpoint);
a conversion into one writes ``DST/checkpoint-000000`` and the tokenizer next to it, so that
``latentmoe generate --checkpoint DST`` finds them.

Destinations follow latentmoe's file rules (docs/safety.md): DST must be new, empty, or a previous conversion of
the same kind (its ``.latentmoe.json`` marker says so); with ``overwrite`` it may hold other files, which are
kept. DST may never be the source itself, lie inside it, or be a training run or checkpoint.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from latentmoe.checkpoint import CheckpointError, load_model, resolve_checkpoint, save_checkpoint
from latentmoe.checkpoint.layout import STATE_FILE
from latentmoe.hf.errors import HFCheckpointError
from latentmoe.hf.files import is_hf_checkpoint
from latentmoe.hf.gguf_export import GGUF_SUFFIX, is_our_gguf, save_gguf
from latentmoe.hf.load import inspect_checkpoint, load_pretrained
from latentmoe.hf.save import DEFAULT_MAX_SHARD_SIZE, save_pretrained
from latentmoe.hf.save import HF_EXPORT_KIND as HF_EXPORT
from latentmoe.hf.tokenizer import TOKENIZER_NAME, load_run_tokenizer, load_tokenizer, save_tokenizer
from latentmoe.io import (
    DestinationError,
    check_destination,
    check_file_destination,
    claim,
    publish_directory,
    read_ownership,
    temp_dir,
)

HF, LATENTMOE, GGUF = "hf", "latentmoe", "gguf"
KINDS = (HF, LATENTMOE, GGUF)
CONVERTED_KIND = "converted"
TRAINING_KINDS = ("run", "demo")


@dataclass(frozen=True)
class ConvertResult:
    """source/destination with their kinds ("hf" or "latentmoe"); ``written``: the checkpoint directory made;
    ``dtype`` of the weights written; ``mtp_layers`` carried over; ``dequantized``: FP8 tensors dequantised."""

    source: Path
    source_kind: str
    destination: Path
    destination_kind: str
    written: Path
    dtype: torch.dtype
    num_parameters: int
    mtp_layers: int
    dequantized: int
    tokenizer: bool


def checkpoint_kind(path: str | os.PathLike) -> str:
    """"hf" for a Hugging Face directory, "latentmoe" for one of our checkpoints or run directories."""
    if is_hf_checkpoint(path):
        return HF
    try:
        resolve_checkpoint(path)
    except CheckpointError:
        raise HFCheckpointError(
            f"{path}: neither a Hugging Face checkpoint (config.json + model.safetensors[.index.json]) "
            "nor a latentmoe checkpoint or run directory"
        ) from None
    return LATENTMOE


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str | None = None,
    dtype: torch.dtype | None = None,
    dequantize: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    device: str | torch.device | None = None,
) -> ConvertResult:
    """Convert ``src`` into ``dst``; ``to`` defaults to the other kind than ``src``'s.

    dtype: of the written weights (default: as stored; bf16 for an FP8 source). FP8 block-quantised sources
    need ``dequantize=True`` — our model holds full-precision weights. ``overwrite``: see the module docstring.
    ``device``: where the weights are loaded (and dequantised) on the way; the files are written from the host.
    Everything about the destination is checked before any weights are read.
    """
    src, dst = Path(src), Path(dst)
    kind = checkpoint_kind(src)
    to = to or (LATENTMOE if kind == HF else HF)
    if to not in KINDS:
        raise ValueError(f"to must be one of {KINDS}, got {to!r}")
    if kind == LATENTMOE and to == LATENTMOE:
        raise ValueError(f"{src} is already a latentmoe checkpoint; convert it to the hf layout or copy it")
    check_not_source(src, dst)
    if to == GGUF:
        if dst.suffix != GGUF_SUFFIX:
            raise HFCheckpointError(f"{dst}: a GGUF export is one file; name it NAME{GGUF_SUFFIX}")
        try:
            check_file_destination(dst, ours=is_our_gguf, overwrite=overwrite)
        except DestinationError as exc:
            raise HFCheckpointError(str(exc)) from None
    else:
        destination = _check(dst, kinds=(HF_EXPORT if to == HF else CONVERTED_KIND,), overwrite=overwrite,
                             writes=(TOKENIZER_NAME,))
    dequantized = 0
    if kind == HF:
        info = inspect_checkpoint(src)
        if info.fp8_tensors and not dequantize:
            raise HFCheckpointError(
                f"{src}: {info.fp8_tensors} tensors are FP8 block-quantised; pass --dequantize to convert them"
            )
        dequantized = info.fp8_tensors
        dtype = dtype or (torch.bfloat16 if info.fp8_tensors else info.stored_dtype)
        model = load_pretrained(src, dtype=dtype, device=device)
        tokenizer = load_tokenizer(src)
    else:
        ckpt = resolve_checkpoint(src)
        model, _ = load_model(ckpt, device=device)
        dtype = dtype or model.lm_head.weight.dtype
        tokenizer = load_run_tokenizer(ckpt, config=model.config)  # our prompt rule, and a chat template if any
    if to == GGUF:
        if tokenizer is None:
            raise HFCheckpointError(f"{src}: has no tokenizer.json; a GGUF file needs the tokenizer")
        written = save_gguf(model, dst, tokenizer=tokenizer, dtype=dtype, name=src.resolve().name,
                            overwrite=overwrite).path
    elif to == HF:
        written = save_pretrained(model, dst, tokenizer=tokenizer, max_shard_size=max_shard_size, dtype=dtype,
                                  overwrite=overwrite).path
    else:
        written = _write_converted(model, destination, tokenizer=tokenizer, source=src)
    return ConvertResult(
        source=src,
        source_kind=kind,
        destination=dst,
        destination_kind=to,
        written=written,
        dtype=dtype,
        num_parameters=model.num_parameters(),
        mtp_layers=0 if to == GGUF else len(model.mtp),
        dequantized=dequantized,
        tokenizer=tokenizer is not None,
    )


def check_not_source(src: Path, dst: Path) -> None:
    """A conversion never writes over its source, into it, or into a training run or checkpoint."""
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise HFCheckpointError(f"{dst}: is (or contains, or lies inside) the source {src}; choose another destination")
    owner = read_ownership(d) if d.is_dir() else None
    if (d / STATE_FILE).exists() or (owner is not None and owner.kind in TRAINING_KINDS):
        raise HFCheckpointError(f"{dst}: is a training run or checkpoint; an export never writes into one")
    for parent in d.parents:
        if (parent / STATE_FILE).exists():
            raise HFCheckpointError(f"{dst}: lies inside the training checkpoint {parent}; choose another destination")


def _check(dst: Path, *, kinds: tuple[str, ...], overwrite: bool, writes: tuple[str, ...]):
    try:
        return check_destination(dst, kinds=kinds, overwrite=overwrite, writes=writes)
    except DestinationError as exc:
        raise HFCheckpointError(str(exc)) from None


def _write_converted(model, destination, *, tokenizer, source: Path) -> Path:
    """``checkpoint-000000`` (+ ``tokenizer.json``) built in a temporary sibling, then published as the destination."""
    dst = destination.path
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(dst.parent, dst.name)
    try:
        ckpt = save_checkpoint(tmp, 0, model, None, {"converted_from": str(source)}, model.config,
                               owner_kind=CONVERTED_KIND)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp, config=model.config)
            claim(tmp, CONVERTED_KIND, [p.name for p in tmp.iterdir() if p.name.startswith("tokenizer")])
        publish_directory(tmp, destination, kind=CONVERTED_KIND)
    except DestinationError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HFCheckpointError(str(exc)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our temporary directory: only our files are in it
        raise
    return dst / ckpt.name
