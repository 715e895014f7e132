"""From text to training batches: one token stream per split, random windows, validation windows.

The token stream
----------------
:func:`encode_splits` encodes every document on its own and concatenates them, each framed by
the special tokens, into one 1-D int64 tensor per split::

    [BOS] hamlet tokens ... [EOS] [BOS] lear tokens ... [EOS] ...

so the model sees where a document starts and learns to end one with EOS. This is the in-memory
reference of what prepare-data writes to token shards (``latentmoe.data.prepare``): training reads
prepared datasets, the shipped corpus included (``prepare_shipped_corpus``).

Batches
-------
A batch is ``B`` windows of ``T`` consecutive tokens, ``[B, T]`` int64. The model predicts
token ``t + 1`` from tokens ``<= t``, so a window of ``T`` tokens gives ``T - 1`` targets
(the model shifts the labels itself; no window extends past the stream).

- :func:`random_windows` (training): window starts drawn uniformly from ``[0, N - T]`` by a
  ``torch.Generator`` seeded from ``(seed, step)`` alone. No global RNG is touched and nothing
  depends on earlier draws, so a run resumed at step ``k`` sees exactly the batches an
  uninterrupted run would have seen at step ``k``.
- :func:`val_batches` (validation): a fixed set of non-overlapping windows spread evenly over
  the validation stream, the same every time, so validation losses are comparable across steps
  and runs.

The baseline
------------
:func:`unigram_cross_entropy` is the loss of the simplest model that knows token frequencies
and nothing else: ``p(v) = (count_train(v) + 1) / (N_train + V)`` (add-one smoothing, so no
token has probability zero), scored as ``-mean(log p(v))`` over the eval ids in nats/token —
the same unit as the model's cross-entropy. A language model that has learned anything from
context must go below it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from latentmoe.data.corpus import CorpusSplits
from latentmoe.data.tokenizer import BOS_ID, EOS_ID
from latentmoe.device import HOST

# Mixes (seed, step) into one generator seed; a prime, so nearby (seed, step) pairs don't collide
# for step < 1_000_003.
SEED_STEP_MULTIPLIER = 1_000_003
GENERATOR_SEED_MODULUS = 2**63


@dataclass(frozen=True)
class TokenSplits:
    """The encoded corpus.

    train: ``[N_train]`` int64, every training document as ``BOS ids EOS``, concatenated.
    val:   ``[N_val]`` int64, the same for the validation parts.
    """

    train: torch.Tensor
    val: torch.Tensor


@dataclass(frozen=True)
class TokenBatch:
    """A batch whose loss counts only some tokens (chat fine-tuning: the assistant's).

    ids:       ``[B, S]`` int64 token ids.
    loss_mask: ``[B, S]`` bool, True where the token is a target that counts (see
               :func:`latentmoe.model.mtp.next_token_loss`); None: every token counts.

    It slices by rows and moves like a tensor (``batch[a:b]``, ``.to(device)``, ``.shape``), so whatever
    splits a global batch over ranks splits its mask with it.
    """

    ids: torch.Tensor
    loss_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.loss_mask is not None and self.loss_mask.shape != self.ids.shape:
            raise ValueError(f"loss_mask has shape {tuple(self.loss_mask.shape)}, ids {tuple(self.ids.shape)}")

    @property
    def shape(self) -> torch.Size:
        return self.ids.shape

    def numel(self) -> int:
        return self.ids.numel()

    def __getitem__(self, rows: slice) -> TokenBatch:
        return TokenBatch(self.ids[rows], None if self.loss_mask is None else self.loss_mask[rows])

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.ids.to(device), None if self.loss_mask is None else self.loss_mask.to(device))


def split_batch(batch: torch.Tensor | TokenBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ids_BS, loss_mask_BS or None)`` of a plain ``[B, S]`` tensor or a :class:`TokenBatch`."""
    if isinstance(batch, TokenBatch):
        return batch.ids, batch.loss_mask
    return batch, None


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """``[N]`` int64: each text encoded alone, framed as ``BOS ids EOS``, concatenated in order.

    Empty texts are skipped (a document with no validation part adds nothing to val).
    """
    texts = [text for text in texts if text]
    if not texts:
        return torch.empty(0, dtype=torch.int64)
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    pieces = [torch.tensor([BOS_ID, *encoding.ids, EOS_ID], dtype=torch.int64) for encoding in encodings]
    return torch.cat(pieces)


def encode_splits(tokenizer: Tokenizer, splits: CorpusSplits) -> TokenSplits:
    """Both splits encoded in memory (see the module docstring): the reference for a prepared dataset's streams."""
    return TokenSplits(
        train=encode_documents(tokenizer, splits.train_parts),
        val=encode_documents(tokenizer, splits.val_parts),
    )


def _check_stream(ids_N: torch.Tensor, seq_len: int) -> None:
    if ids_N.dim() != 1:
        raise ValueError(f"ids_N must be 1-D, got shape {tuple(ids_N.shape)}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if ids_N.numel() < seq_len:
        raise ValueError(f"stream of {ids_N.numel()} tokens is shorter than seq_len={seq_len}")


def window_generator(seed: int, step: int) -> torch.Generator:
    """A fresh CPU generator whose state depends only on ``(seed, step)``."""
    generator = torch.Generator(device=HOST)
    generator.manual_seed((seed * SEED_STEP_MULTIPLIER + step) % GENERATOR_SEED_MODULUS)
    return generator


def random_windows(ids_N: torch.Tensor, *, batch_size: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
    """``[batch_size, seq_len]`` int64: random contiguous windows of ``ids_N``, a function of (seed, step).

    ids_N: ``[N]`` integer token stream (any device; the result is on the same device).
    Window ``b`` is ``ids_N[start_b : start_b + seq_len]`` with ``start_b`` uniform in
    ``[0, N - seq_len]``, drawn from :func:`window_generator` ``(seed, step)``; windows may overlap.
    """
    _check_stream(ids_N, seq_len)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    n_starts = ids_N.numel() - seq_len + 1
    starts_B = torch.randint(0, n_starts, (batch_size,), generator=window_generator(seed, step))
    positions_BT = starts_B[:, None] + torch.arange(seq_len)[None, :]
    return ids_N[positions_BT.to(ids_N.device)].long()


def val_batches(ids_N: torch.Tensor, *, batch_size: int, seq_len: int, max_batches: int) -> list[torch.Tensor]:
    """Deterministic validation batches: non-overlapping windows spread evenly over ``ids_N``.

    ids_N: ``[N]`` integer token stream. The stream holds ``S = N // seq_len`` non-overlapping
    slots ``[s * seq_len, (s + 1) * seq_len)``; ``W = min(S, batch_size * max_batches)`` of them
    are taken, slot ``floor(i * S / W)`` for ``i = 0 .. W - 1`` (all of them when ``W == S``).
    Returns ``ceil(W / batch_size)`` tensors ``[b, seq_len]`` int64, ``b = batch_size`` except
    possibly the last, which holds the remainder.
    """
    _check_stream(ids_N, seq_len)
    if batch_size < 1 or max_batches < 1:
        raise ValueError(f"batch_size and max_batches must be >= 1, got {batch_size}, {max_batches}")
    n_slots = ids_N.numel() // seq_len
    n_windows = min(n_slots, batch_size * max_batches)
    slots_W = torch.arange(n_windows) * n_slots // n_windows
    positions_WT = slots_W[:, None] * seq_len + torch.arange(seq_len)[None, :]
    windows_WT = ids_N[positions_WT.to(ids_N.device)].long()
    return list(windows_WT.split(batch_size))


def unigram_cross_entropy(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on ``eval_ids`` of an add-one-smoothed unigram model of ``train_ids``.

    ``p(v) = (count_train(v) + 1) / (N_train + vocab_size)``; returns ``-mean(log p(eval_ids))``,
    a per-token average over every eval id (any shape, flattened). To compare with a model's
    validation loss on exactly its targets, pass those targets, e.g. ``batch[:, 1:]`` of each
    :func:`val_batches` window; over a long stream the difference is negligible.
    """
    train_flat = train_ids.reshape(-1).long().cpu()
    eval_flat = eval_ids.reshape(-1).long().cpu()
    if eval_flat.numel() == 0:
        raise ValueError("eval_ids is empty")
    for name, ids in (("train_ids", train_flat), ("eval_ids", eval_flat)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"{name} has ids outside [0, {vocab_size})")
    counts_V = torch.bincount(train_flat, minlength=vocab_size).to(torch.float64)
    log_p_V = torch.log(counts_V + 1.0) - math.log(train_flat.numel() + vocab_size)
    return float(-log_p_V[eval_flat].mean())
