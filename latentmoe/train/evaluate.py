"""Validation and evaluation: the main head's next-token loss over batches, in eval mode, under the run's precision.

:func:`evaluate` is what the trainer's validation reports: the mean over the batches of each batch's mean
next-token loss (nats/token). :func:`score` computes that same number in the same loop and, given how many
bytes of text each token id stands for, also

    perplexity    = exp(loss)
    bits per byte = Σ_targets -ln p(target) / ln 2 / Σ_targets bytes(target)

where the sums run over every scored target token (BOS/EOS and other special tokens stand for 0 bytes but their
loss counts: predicting where a document ends is part of modelling it). Bits per byte compares models with
different tokenizers; the loss and perplexity do not.

:func:`evaluate_checkpoint` is ``latentmoe eval``: a checkpoint (ours or Hugging Face) on the validation (or
training) windows of a prepared dataset — the very windows the trainer validates on, ``val_batches`` — or on
raw files tokenised with the checkpoint's tokenizer.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentmoe.data.batching import TokenBatch, split_batch
from latentmoe.model.mtp import IGNORE_INDEX, next_token_loss


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16" and "fp8" (the converted GEMMs run in FP8, everything else under bf16 autocast)."""
    if precision in ("bf16", "fp8"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class EvalResult:
    """What :func:`score` measured. ``loss``: mean of the batches' mean next-token losses (nats/token, what the
    trainer logs as ``val_loss``); ``perplexity``: exp(loss); ``bits_per_byte``: None without byte counts;
    ``tokens``: targets scored; ``bytes``: UTF-8 bytes they stand for; ``batches`` and ``windows`` scored."""

    loss: float
    perplexity: float
    bits_per_byte: float | None
    tokens: int
    bytes: int | None
    batches: int
    windows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def score(
    model: nn.Module,
    batches: Iterable[torch.Tensor | TokenBatch],
    *,
    byte_lengths: torch.Tensor | None = None,
    max_batches: int | None = None,
    precision: str = "fp32",
) -> EvalResult:
    """Score ``batches`` of ``[B, S]`` ids (or TokenBatches: masked targets only) in eval mode (module docstring).

    byte_lengths: ``[V]`` int64, the bytes each token id stands for
    (:func:`latentmoe.data.tokenizer.token_byte_lengths`); without it there is no bits per byte. The MTP heads
    are not run: evaluation measures the model that generates. The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count, windows = 0.0, 0, 0
    nats, tokens, n_bytes = 0.0, 0, 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            ids, mask = split_batch(batch.to(device))
            with autocast(device, precision):
                logits = model(ids, compute_mtp=False).logits
            total += float(next_token_loss(logits, ids, loss_mask_BS=mask))
            count += 1
            windows += ids.shape[0]
            targets = _targets(ids, mask)
            counted = targets != IGNORE_INDEX
            tokens += int(counted.sum())
            if byte_lengths is not None:
                per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                            reduction="none")
                nats += float(per_token.double().sum())
                n_bytes += int(byte_lengths.to(device)[targets[counted]].sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no validation batches to evaluate")
    loss = total / count
    bpb = nats / math.log(2) / n_bytes if byte_lengths is not None and n_bytes else None
    return EvalResult(loss=loss, perplexity=_exp(loss), bits_per_byte=bpb, tokens=tokens,
                      bytes=n_bytes if byte_lengths is not None else None, batches=count, windows=windows)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _targets(ids_BS: torch.Tensor, mask_BS: torch.Tensor | None) -> torch.Tensor:
    """``[B, S]``: the next token at every position that has one (and is marked), IGNORE_INDEX elsewhere."""
    targets = F.pad(ids_BS[:, 1:], (0, 1), value=IGNORE_INDEX)
    if mask_BS is not None:
        targets = targets.masked_fill(~F.pad(mask_BS[:, 1:].bool(), (0, 1), value=False), IGNORE_INDEX)
    return targets


def evaluate(
    model: nn.Module,
    batches: Iterable[torch.Tensor | TokenBatch],
    *,
    max_batches: int | None = None,
    precision: str = "fp32",
) -> float:
    """Mean main-head next-token loss (nats/token) over ``batches`` of ``[B, S]`` ids, in eval mode: the mean of
    the batches' means. A :class:`~latentmoe.data.batching.TokenBatch` counts only its masked targets. The MTP
    heads are not run; the model's previous train/eval mode is restored afterwards."""
    return score(model, batches, max_batches=max_batches, precision=precision).loss


# ---------------------------------------------------------------------------------------------- latentmoe eval


@dataclass(frozen=True)
class CheckpointEval:
    """:func:`evaluate_checkpoint`'s answer: the scores and what was scored."""

    result: EvalResult
    checkpoint: str
    data: str
    split: str | None
    seq_len: int
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "data": self.data, "split": self.split, "seq_len": self.seq_len,
                "batch_size": self.batch_size, **self.result.to_dict()}


def run_settings(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The training settings a checkpoint of ours was trained with ({} for other checkpoints)."""
    from latentmoe.checkpoint import STATE_FILE, resolve_checkpoint
    from latentmoe.hf import is_hf_checkpoint
    from latentmoe.io import read_json

    path = Path(checkpoint)
    if is_hf_checkpoint(path):
        return {}
    try:
        state = read_json(resolve_checkpoint(path) / STATE_FILE)
    except (OSError, ValueError):
        return {}
    settings = state.get("train_config") if isinstance(state, dict) else None
    return settings if isinstance(settings, dict) else {}


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: Sequence[str | os.PathLike],
    *,
    split: str | None = None,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    text_field: str = "text",
) -> CheckpointEval:
    """Loss, perplexity and bits per byte of ``checkpoint`` (ours or a Hugging Face directory) on ``data``.

    ``data`` is one prepared dataset (``split`` "val", the default, or "train": the windows of ``val_batches``,
    ``max_batches`` of them or every one) or raw files / directories (every document, framed ``BOS ids EOS``
    with the checkpoint's tokenizer, cut into non-overlapping windows; ``split`` must be None). A dataset
    tokenised with another vocabulary, or windows longer than the model's context, are one-line errors."""
    from latentmoe.data.batching import val_batches
    from latentmoe.data.dataset import TokenDataset
    from latentmoe.data.shards import DatasetError, is_dataset_dir
    from latentmoe.data.sources import iter_documents
    from latentmoe.data.tokenizer import token_byte_lengths
    from latentmoe.hf.tokenizer import encode_prompt
    from latentmoe.pretrained import load

    model, tokenizer = load(checkpoint, device=device, dtype=dtype)
    config = model.config
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    paths = [Path(p) for p in data]
    if len(paths) == 1 and is_dataset_dir(paths[0]):
        split = split or "val"
        dataset = TokenDataset.open(paths[0])
        dataset.check_model(config.vocab_size, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
        if dataset.tokenizer.get_vocab(with_added_tokens=True) != inner.get_vocab(with_added_tokens=True):
            raise DatasetError(f"{paths[0]}: prepared with another tokenizer than {checkpoint}'s; prepare the data "
                               f"with --tokenizer {checkpoint}")
        if dataset.num_tokens(split) < seq_len:
            raise DatasetError(f"{paths[0]}: the {split} split has {dataset.num_tokens(split)} tokens, fewer than "
                               f"--seq-len {seq_len}")
        slots = dataset.num_tokens(split) // seq_len
        batches = dataset.val_batches(batch_size=batch_size, seq_len=seq_len,
                                      max_batches=max_batches or -(-slots // batch_size), split=split)
    else:
        if split is not None:
            raise ValueError("--split applies to a prepared dataset; raw files are evaluated whole")
        pieces = []
        eos = config.eos_token_id
        for document in iter_documents(paths, text_field=text_field):
            # a document is scored as a prompt is encoded (the tokenizer's rule: BOS first for ours), then EOS
            ids = encode_prompt(tokenizer, document.text, bos_token_id=config.bos_token_id)
            pieces.append(torch.tensor([*ids, *([eos] if eos is not None and ids[-1:] != [eos] else [])],
                                       dtype=torch.int64))
        stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)
        if stream.numel() < seq_len:
            raise ValueError(f"{', '.join(map(str, paths))}: {stream.numel()} tokens, fewer than --seq-len {seq_len}")
        if int(stream.max()) >= config.vocab_size:
            raise ValueError(f"{checkpoint}: its tokenizer produces ids beyond the model's vocab_size")
        slots = stream.numel() // seq_len
        batches = val_batches(stream, batch_size=batch_size, seq_len=seq_len,
                              max_batches=max_batches or -(-slots // batch_size))
    lengths = torch.from_numpy(token_byte_lengths(inner, config.vocab_size))
    result = score(model, batches, byte_lengths=lengths)
    return CheckpointEval(result, str(checkpoint), ", ".join(map(str, paths)), split, seq_len, batch_size)
