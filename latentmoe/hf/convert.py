"""``latentmoe convert``: Hugging Face layout ⇄ our training checkpoints (and HF → HF, e.g. FP8 → BF16).

Our checkpoints are run directories (``checkpoint-STEP/`` + ``tokenizer.json``, see train/checkpoint.py);
a conversion into one writes ``DST/checkpoint-000000`` and the tokenizer next to it, so that
``latentmoe generate --checkpoint DST`` and ``latentmoe train --resume`` find them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from latentmoe.hf.errors import HFCheckpointError
from latentmoe.hf.files import is_hf_checkpoint
from latentmoe.hf.load import inspect_checkpoint, load_pretrained
from latentmoe.hf.save import DEFAULT_MAX_SHARD_SIZE, save_pretrained
from latentmoe.hf.tokenizer import load_tokenizer, save_tokenizer

HF, LATENTMOE = "hf", "latentmoe"
KINDS = (HF, LATENTMOE)


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
    from latentmoe.train.checkpoint import CheckpointError, resolve_checkpoint

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
) -> ConvertResult:
    """Convert ``src`` into ``dst``; ``to`` defaults to the other kind than ``src``'s.

    dtype: of the written weights (default: as stored; bf16 for an FP8 source). FP8 block-quantised sources
    need ``dequantize=True`` — our model holds full-precision weights.
    """
    from latentmoe.train.checkpoint import load_model, resolve_checkpoint, save_checkpoint

    src, dst = Path(src), Path(dst)
    kind = checkpoint_kind(src)
    to = to or (LATENTMOE if kind == HF else HF)
    if to not in KINDS:
        raise ValueError(f"to must be one of {KINDS}, got {to!r}")
    if kind == LATENTMOE and to == LATENTMOE:
        raise ValueError(f"{src} is already a latentmoe checkpoint; convert it to the hf layout or copy it")
    dequantized = 0
    if kind == HF:
        info = inspect_checkpoint(src)
        if info.fp8_tensors and not dequantize:
            raise HFCheckpointError(
                f"{src}: {info.fp8_tensors} tensors are FP8 block-quantised; pass --dequantize to convert them"
            )
        dequantized = info.fp8_tensors
        dtype = dtype or (torch.bfloat16 if info.fp8_tensors else info.stored_dtype)
        model = load_pretrained(src, dtype=dtype)
        tokenizer = load_tokenizer(src)
    else:
        ckpt = resolve_checkpoint(src)
        model, _ = load_model(ckpt)
        dtype = dtype or model.lm_head.weight.dtype
        tokenizer = _our_tokenizer(ckpt)
    if to == HF:
        written = save_pretrained(model, dst, tokenizer=tokenizer, max_shard_size=max_shard_size, dtype=dtype).path
    else:
        written = save_checkpoint(dst, 0, model, None, {"converted_from": str(src)}, model.config)
        if tokenizer is not None:
            save_tokenizer(tokenizer, dst, config=model.config)
    return ConvertResult(
        source=src,
        source_kind=kind,
        destination=dst,
        destination_kind=to,
        written=written,
        dtype=dtype,
        num_parameters=model.num_parameters(),
        mtp_layers=len(model.mtp),
        dequantized=dequantized,
        tokenizer=tokenizer is not None,
    )


def _our_tokenizer(ckpt: Path):
    """``tokenizer.json`` next to one of our checkpoints (in it or in its run directory), or None."""
    from tokenizers import Tokenizer

    for candidate in (ckpt / "tokenizer.json", ckpt.parent / "tokenizer.json"):
        if candidate.is_file():
            return Tokenizer.from_file(str(candidate))
    return None
